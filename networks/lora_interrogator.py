#!/usr/bin/env python
"""Which tokens a LoRA's text-encoder part reacts to (sd-scripts v0.8.7 ``networks/lora_interrogator.py``).

Every token id from 0 to the tokenizer's highest special id is encoded alone as ``[BOS, token, EOS]``, by the
text encoder without and with the LoRA's text-encoder modules (multiplier 1); a token's score is the mean absolute
difference of the two outputs (all three positions, every channel). The 100 highest are printed as upstream does:
``top 100:`` then ``[  i]: token_id token_text          : score``. ``--clip_skip n`` compares the n-th layer from
the end (through the final layer norm). SD1 / SD2 models only, as upstream; the tokenizer is built offline.
A LoRA without text-encoder modules is refused (exit 2): it cannot change any token's encoding.
Precision: fp16 on a GPU (upstream), fp32 on the CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.models.loading import load_models, peek_family  # noqa: E402
from library.models.tokenizers import token_text  # noqa: E402
from networks.lora import create_network_from_weights  # noqa: E402
from networks.lora_family import check_lora_matches  # noqa: E402
from networks.lora_tool_io import check_inputs_exist, read_lora  # noqa: E402

logger = logging.getLogger(__name__)

TOP = 100
_TE_PREFIX = "lora_te"  # upstream's test: any key containing it (lora_te_, and SDXL's lora_te1_ / lora_te2_)


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--v2", action="store_true", help="the model is Stable Diffusion 2.x (checked against the file)")
    p.add_argument("--sd_model", type=str, default=None,
                   help="Stable Diffusion model: .ckpt / .safetensors file or Diffusers folder")
    p.add_argument("--model", type=str, default=None, help="LoRA to interrogate (.safetensors, .ckpt, .pt)")
    p.add_argument("--batch_size", type=int, default=16, help="token sequences per text-encoder call (default 16)")
    p.add_argument("--clip_skip", type=int, default=None,
                   help="compare the n-th layer's output from the end (n >= 1) instead of the last one")
    add_logging_arguments(p)
    return p


def check_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Everything knowable before the model loads; returns the LoRA's tensors."""
    for option in ("sd_model", "model"):
        if not getattr(args, option):
            raise UserError(f"--{option} is required")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be 1 or more")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip {args.clip_skip}: must be 1 or more")
    if not os.path.exists(args.sd_model):
        raise UserError(f"--sd_model: no such file or folder: {args.sd_model}")
    check_inputs_exist([args.model], "--model")
    weights, _ = read_lora(args.model)
    if not any(_TE_PREFIX in k for k in weights):
        raise UserError(f"--model {args.model}: this LoRA has no text-encoder modules (lora_te_*): its effect on "
                        "tokens cannot be interrogated")
    family = peek_family(args.sd_model)
    if family is not None:
        if family == "sdxl":
            raise UserError(f"--sd_model {args.sd_model}: SDXL models are not supported (SD1 / SD2 only, as "
                            "sd-scripts' lora_interrogator.py)")
        check_lora_matches(args.model, family, "--model")
    return weights


def _final_norm(te: torch.nn.Module) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`)
    return getattr(te, "text_model", te).final_layer_norm


def encode_tokens(te: torch.nn.Module, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """(N, 3) ids -> (N, 3, D): the last layer's output, or the n-th from the end through the final layer norm."""
    if clip_skip is None:
        return te(ids)[0]
    hidden = te(ids, output_hidden_states=True, return_dict=True).hidden_states[-clip_skip]
    return _final_norm(te)(hidden)


@torch.no_grad()
def token_scores(te: torch.nn.Module, network, token_ids: Sequence[int], bos: int, eos: int, batch_size: int,
                 clip_skip: int | None) -> list[float]:
    """mean |TE(ids) - TE_lora(ids)| per token; the LoRA is switched off (multiplier 0) for the plain pass, so
    neither pass is stored whole (upstream kept both: 2 x 49408 x 3 x D values)."""
    device = next(te.parameters()).device
    scores: list[float] = []
    for start in tqdm(range(0, len(token_ids), batch_size), desc="tokens"):
        chunk = torch.tensor(token_ids[start:start + batch_size])
        ids = torch.stack([torch.full_like(chunk, bos), chunk, torch.full_like(chunk, eos)], dim=1).to(device)
        network.set_multiplier(0.0)
        plain = encode_tokens(te, ids, clip_skip).float()
        network.set_multiplier(1.0)
        with_lora = encode_tokens(te, ids, clip_skip).float()
        scores += (plain - with_lora).abs().mean(dim=(1, 2)).tolist()
    return scores


def report_lines(token_ids: Sequence[int], scores: Sequence[float], tokenizer, top: int = TOP) -> list[str]:
    """Upstream's printout: the ``top`` highest scores (ties in token order)."""
    ranked = sorted(zip(token_ids, scores), key=lambda item: -item[1])[:top]
    lines = [f"top {top}:"]
    for i, (token, score) in enumerate(ranked):
        lines.append(f"[{i:3d}]: {token:5d} {token_text(tokenizer, token):<20s}: {score:.5f}")
    return lines


def _attach(args: argparse.Namespace, models, weights: dict[str, torch.Tensor], device: torch.device):
    """The LoRA's text-encoder modules on the model's text encoder; a module the model lacks is an error."""
    te = models.text_encoders[0]
    network, _ = create_network_from_weights(1.0, None, models.vae, te, models.unet, weights_sd=weights)
    network.apply_to(te, models.unet, True, False)
    info = network.load_state_dict(weights, strict=False)
    foreign = [k for k in info.unexpected_keys if k.startswith(_TE_PREFIX)]
    if foreign or not network.text_encoder_loras:
        raise UserError(f"--model {args.model}: text-encoder modules that this model does not have "
                        f"({', '.join(foreign[:3]) or 'none matched'}): a LoRA for another model?")
    network.to(device, next(te.parameters()).dtype).eval()
    return network


def interrogate(args: argparse.Namespace) -> list[str]:
    """Load, score every token, return the printed lines."""
    weights = check_inputs(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    logger.info("loading SD model: %s", args.sd_model)
    models = load_models(args.sd_model, v2=args.v2, sdxl=False, dtype=dtype)
    check_lora_matches(args.model, models.family, "--model")
    te, tokenizer = models.text_encoders[0].to(device).eval(), models.tokenizers[0]
    layers = te.config.num_hidden_layers
    if args.clip_skip is not None and args.clip_skip > layers:
        raise UserError(f"--clip_skip {args.clip_skip}: the text encoder has only {layers} layers")
    network = _attach(args, models, weights, device)
    last = min(max(tokenizer.all_special_ids), te.config.vocab_size - 1)
    token_ids = list(range(0, last + 1))
    logger.info("interrogate tokens are: %d to %d", token_ids[0], last)
    scores = token_scores(te, network, token_ids, tokenizer.bos_token_id, tokenizer.eos_token_id, args.batch_size,
                          args.clip_skip)
    return report_lines(token_ids, scores, tokenizer)


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[str]:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    lines = interrogate(args)
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
