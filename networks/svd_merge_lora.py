#!/usr/bin/env python
"""Merge LoRAs exactly, then re-factor each module to a new rank by SVD (spec utilities §8).

Per module ``ΔW = Σ ratio_i·(alpha_i/rank_i)·up_i@down_i`` (linear in the ratios, unlike merge_lora.py's
LoRA+LoRA mode), then the best rank-r factors (``--new_rank``; ``--new_conv_rank`` for 3x3 convs),
clamped at their 0.99 quantile, ``alpha = r``. The sum runs in ``--precision``; the SVD always in
float32 (no half-precision SVD kernels). ``sshs_*`` hashes are computed after the ``--save_precision``
cast, so they match the saved file (sd-scripts v0.8.7 hashed before it).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from networks.lora_family import check_same_family  # noqa: E402
from networks.lora_svd import module_delta, svd_factors  # noqa: E402
from networks.lora_tool_io import (check_inputs_exist, check_lora_output, complete_modules, merged_from,  # noqa: E402
                                   module_alpha, precision_dtype, read_lora, save_lora)
from library.formats.metadata import build_minimum_network_metadata  # noqa: E402
from library.formats.modelspec import build_modelspec  # noqa: E402

logger = logging.getLogger(__name__)

CLAMP_QUANTILE = 0.99


def build_parser() -> argparse.ArgumentParser:
    """Options of spec §8."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of the saved LoRA (default: the merge precision)")
    p.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                   help="dtype of the summation (default: float)")
    p.add_argument("--save_to", type=str, default=None, help="output LoRA (.ckpt, .pt or .safetensors)")
    p.add_argument("--models", type=str, nargs="*", help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", help="one ratio per LoRA file")
    p.add_argument("--new_rank", type=int, default=4, help="rank of Linear and 1x1 modules (default: 4)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 modules (default: --new_rank)")
    p.add_argument("--device", type=str, default=None, help="device for the math, e.g. cuda (default: cpu)")
    p.add_argument("--no_metadata", action="store_true", help="do not write modelspec metadata")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it (wrappers import it)


def sum_deltas(paths: list[str], ratios: list[float], dtype: torch.dtype,
               device: str | None) -> tuple[dict[str, torch.Tensor], str | None, str | None]:
    """``{module: Σ ratio·(alpha/rank)·up@down}`` in ``dtype``, plus ss_v2 / base model of the first input."""
    deltas: dict[str, torch.Tensor] = {}
    v2 = base_model = None
    for path, ratio in zip(paths, ratios):
        sd, meta = read_lora(path)
        v2 = v2 if v2 is not None else meta.get("ss_v2")
        base_model = base_model if base_model is not None else meta.get("ss_base_model_version")
        for name, parts in complete_modules(sd, path).items():
            delta = (module_delta(parts["lora_up.weight"].to(device), parts["lora_down.weight"].to(device),
                                  module_alpha(parts)) * ratio).to(dtype)
            if name in deltas and deltas[name].shape != delta.shape:
                raise UserError(f"{path}: module {name} has shape {tuple(delta.shape)}, an earlier model "
                                f"{tuple(deltas[name].shape)}")
            deltas[name] = deltas[name] + delta if name in deltas else delta
    return deltas, v2, base_model


def refactor(deltas: dict[str, torch.Tensor], new_rank: int, new_conv_rank: int,
             device: str | None) -> dict[str, torch.Tensor]:
    """Rank-r factors of every summed delta, clamped at the 0.99 quantile, alpha = r (§8)."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, delta in tqdm(deltas.items(), desc="extracting", smoothing=0):
            is_kxk = delta.ndim == 4 and tuple(delta.shape[2:]) != (1, 1)
            factors = svd_factors(delta.float(), new_conv_rank if is_kxk else new_rank, CLAMP_QUANTILE, device)
            out[f"{name}.lora_up.weight"] = factors.up
            out[f"{name}.lora_down.weight"] = factors.down
            out[f"{name}.alpha"] = torch.tensor(float(factors.rank))
    return out


def svd_merge(args: argparse.Namespace) -> None:
    """1. check  2. sum the deltas  3. re-factor  4. metadata  5. save (cast, then hash)."""
    if not args.models or args.ratios is None or len(args.ratios) != len(args.models):
        raise UserError(f"--models/--ratios: give one ratio per model ({len(args.models or [])} models, "
                        f"{len(args.ratios or [])} ratios)")
    check_inputs_exist(args.models, "--models")
    check_same_family(args.models, "--models")  # one model family, equal widths: else the sum is meaningless
    check_lora_output(args.save_to)
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be at least 1")
    merge_dtype = precision_dtype(args.precision, "--precision")
    save_dtype = precision_dtype(args.save_precision, "--save_precision", merge_dtype)
    new_conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    deltas, v2, base_model = sum_deltas(args.models, args.ratios, merge_dtype, args.device)
    sd = refactor(deltas, args.new_rank, new_conv_rank, args.device)
    # conv_dim/conv_alpha always written, since new_conv_rank defaults to new_rank (§8)
    metadata = build_minimum_network_metadata(v2, base_model, "networks.lora", str(args.new_rank),
                                              str(args.new_rank), {"conv_dim": new_conv_rank,
                                                                   "conv_alpha": new_conv_rank})
    if not args.no_metadata:
        is_sdxl = base_model is not None and base_model.lower().startswith("sdxl")
        is_v2 = v2 == "True"
        if is_v2:
            logger.warning("cannot tell whether the LoRA is for v-prediction: modelspec says v-prediction")
        family = "sdxl" if is_sdxl else ("sd2" if is_v2 else "sd1")
        metadata.update(build_modelspec(family, is_v2 and not is_sdxl, "lora", title=Path(args.save_to).stem,
                                        merged_from=merged_from(args.models)))
    save_lora(sd, args.save_to, save_dtype, metadata)
    logger.info("saved %s (%d modules)", args.save_to, len(deltas))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    svd_merge(args)


if __name__ == "__main__":
    main()
