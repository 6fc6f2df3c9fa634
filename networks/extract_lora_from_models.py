#!/usr/bin/env python
"""Extract a LoRA from the difference of two checkpoints by truncated SVD (spec utilities §10).

For every layer a LoRA of ``--dim`` (and ``--conv_dim`` for 3x3 convs) would adapt: ``ΔW = W_tuned −
W_org``, best rank-r factors ``up = U_r·S_r``, ``down = V_rᵀ`` clamped at the ``--clamp_quantile`` of their
values, ``alpha = r`` (scale 1). Text-encoder modules are written only if some TE layer changed by more
than ``--min_diff``. The file is written through the LoRA network's ``save_weights`` (so it gets the
``sshs_*`` hashes of the saved bytes) with the metadata of §10.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from networks.lora_svd import svd_factors  # noqa: E402
from networks.lora_targets import Target, te_prefixes, text_encoder_targets, unet_targets  # noqa: E402
from networks.lora_tool_io import check_inputs_exist, check_lora_output, precision_dtype  # noqa: E402
from library.formats.metadata import base_model_version  # noqa: E402
from library.formats.modelspec import build_modelspec  # noqa: E402
from library.models.loading import load_models  # noqa: E402
from networks.lora import create_network_from_weights  # noqa: E402

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Options of spec §10."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--v2", action="store_true", help="the models are SD 2.x")
    p.add_argument("--v_parameterization", action="store_true", default=None,
                   help="the models are v-prediction (metadata only; default: same as --v2)")
    p.add_argument("--sdxl", action="store_true", help="the models are SDXL")
    p.add_argument("--load_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype the models are loaded in (default: float)")
    p.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of the saved LoRA (default: float); sshs_* hashes describe the saved bytes")
    p.add_argument("--model_org", type=str, default=None, required=True, help="original (base) model file")
    p.add_argument("--model_tuned", type=str, default=None, required=True, help="fine-tuned model file")
    p.add_argument("--save_to", type=str, default=None, required=True, help="output LoRA (.safetensors or .ckpt)")
    p.add_argument("--dim", type=int, default=4, help="rank for Linear and 1x1 conv layers (default: 4)")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="rank for 3x3 conv layers (default: 3x3 convs are not extracted)")
    p.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda (default: cpu)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp both factors to this quantile of their values (default: 0.99)")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="text encoder modules are extracted only if some TE weight changed by more than this "
                        "(default: 0.01)")
    p.add_argument("--no_metadata", action="store_true", help="do not write modelspec metadata")
    p.add_argument("--load_original_model_to", type=str, default=None,
                   help="device to load the original model on (SDXL; default: cpu)")
    p.add_argument("--load_tuned_model_to", type=str, default=None,
                   help="device to load the tuned model on (SDXL; default: cpu)")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it (wrappers import it)


def _targets(models, conv_dim: int | None) -> tuple[list[Target], list[Target]]:
    """The training target set: TE attention/MLP; U-Net LierLa, plus C3Lier layers when conv_dim is set."""
    te = [t for prefix, enc in zip(te_prefixes(len(models.text_encoders)), models.text_encoders)
          for t in text_encoder_targets(prefix, enc)]
    return te, unet_targets(models.unet, include_conv=conv_dim is not None)


def _difference(org: Target, tuned: Target, device: str | None) -> torch.Tensor:
    return tuned.module.weight.detach().to(device, torch.float32) - org.module.weight.detach().to(device, torch.float32)


def weight_differences(org, tuned, conv_dim: int | None, min_diff: float,
                       device: str | None) -> dict[str, tuple[torch.Tensor, bool]]:
    """``{name: (W_tuned − W_org in float32, is 3x3)}``; TE entries only if the TE changed (§10)."""
    te_o, unet_o = _targets(org, conv_dim)
    te_t, unet_t = _targets(tuned, conv_dim)
    diffs: dict[str, tuple[torch.Tensor, bool]] = {}
    te_max = 0.0
    for a, b in zip(te_o, te_t):
        diff = _difference(a, b, device)
        te_max = max(te_max, float(diff.abs().max()))
        diffs[a.lora_name] = (diff, a.is_conv_kxk)
    if te_max > min_diff:
        logger.info("text encoder is different (max |diff| %g > %g)", te_max, min_diff)
    else:
        logger.warning("text encoder is the same (max |diff| %g <= %g): extracting U-Net only", te_max, min_diff)
        diffs = {}
    for a, b in zip(unet_o, unet_t):
        if a.is_conv_kxk and conv_dim is None:
            continue  # LierLa never lists 3x3 layers; C3Lier does, and conv_dim gives their rank
        diffs[a.lora_name] = (_difference(a, b, device), a.is_conv_kxk)
    return diffs


def extract_state_dict(diffs: dict[str, tuple[torch.Tensor, bool]], dim: int, conv_dim: int | None,
                       clamp_quantile: float, device: str | None) -> dict[str, torch.Tensor]:
    """LoRA tensors for every difference: rank ``dim`` (``conv_dim`` for 3x3), alpha = r."""
    sd: dict[str, torch.Tensor] = {}
    for name, (diff, is_kxk) in tqdm(diffs.items(), desc="extracting", smoothing=0):
        factors = svd_factors(diff, conv_dim if is_kxk else dim, clamp_quantile, device)
        sd[f"{name}.alpha"] = torch.tensor(float(factors.rank))
        sd[f"{name}.lora_down.weight"] = factors.down
        sd[f"{name}.lora_up.weight"] = factors.up
    return sd


def extraction_metadata(args: argparse.Namespace, family: str) -> dict[str, str]:
    """The ``ss_*`` keys of §10 plus modelspec (``/lora``) unless ``--no_metadata``.

    ``family`` is the loaded models' (an SD2 file is SD2 even without ``--v2``, which loading implies).
    """
    v2 = family == "sd2"
    v_param = v2 if args.v_parameterization is None else args.v_parameterization
    net_args = {} if args.conv_dim is None else {"conv_dim": str(args.conv_dim),
                                                 "conv_alpha": str(float(args.conv_dim))}
    metadata = {"ss_v2": str(v2), "ss_base_model_version": base_model_version(family, bool(v_param)),
                "ss_network_module": "networks.lora", "ss_network_dim": str(args.dim),
                "ss_network_alpha": str(float(args.dim)), "ss_network_args": json.dumps(net_args)}
    if not args.no_metadata:
        metadata.update(build_modelspec(family, bool(v_param), "lora", title=Path(args.save_to).stem))
    return metadata


def check_args(args: argparse.Namespace) -> None:
    if args.v2 and args.sdxl:
        raise UserError("--v2 and --sdxl cannot be used together")
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise UserError("--dim and --conv_dim must be at least 1")
    if not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: expected a value in (0, 1]")
    check_inputs_exist([args.model_org, args.model_tuned], "--model_org/--model_tuned")
    check_lora_output(args.save_to)


def extract(args: argparse.Namespace) -> None:
    """1. load both models  2. differences  3. SVD per module  4. save through the network."""
    check_args(args)
    load_dtype = precision_dtype(args.load_precision, "--load_precision", torch.float32)
    save_dtype = precision_dtype(args.save_precision, "--save_precision", torch.float32)
    sdxl = bool(args.sdxl)  # False (not None): an SDXL file without --sdxl is an error, not a guess
    org = load_models(args.model_org, v2=args.v2, sdxl=sdxl, dtype=load_dtype,
                      device=(args.load_original_model_to or "cpu") if args.sdxl else "cpu")
    tuned = load_models(args.model_tuned, v2=args.v2, sdxl=sdxl, dtype=load_dtype,
                        device=(args.load_tuned_model_to or "cpu") if args.sdxl else "cpu")
    if org.family != tuned.family:
        raise UserError(f"--model_org is {org.family.upper()} but --model_tuned is {tuned.family.upper()}")
    diffs = weight_differences(org, tuned, args.conv_dim, args.min_diff, args.device)
    if not diffs:
        raise UserError("no module to extract (the models have no LoRA target layers)")
    sd = extract_state_dict(diffs, args.dim, args.conv_dim, args.clamp_quantile, args.device)
    te_arg = org.text_encoders if org.is_sdxl else org.text_encoders[0]
    network, _ = create_network_from_weights(1.0, None, None, te_arg, org.unet, weights_sd=sd)
    info = network.load_state_dict(sd, strict=False)
    if info.unexpected_keys:
        raise UserError(f"internal: extracted modules not in the network: {info.unexpected_keys[:3]}")
    network.save_weights(args.save_to, save_dtype, extraction_metadata(args, org.family))
    logger.info("LoRA weights saved to %s (%d modules)", args.save_to, len(diffs))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    extract(args)


if __name__ == "__main__":
    main()
