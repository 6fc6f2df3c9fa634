#!/usr/bin/env python
"""Change the rank of a LoRA by SVD of each module's ``up@down`` (spec utilities §9).

Fixed rank (``--new_rank``; ``--new_conv_rank`` for every 4-D module, 1x1 convs included, pitfall 5) or a
rank chosen per module by ``--dynamic_method`` sv_ratio / sv_fro / sv_cumulative (capped at
``--new_rank``). ``new_alpha = (alpha/rank)·new_rank`` keeps the effective scale. ``--verbose`` prints,
per module, the retained share of Σσ and of the Frobenius norm, and the relative error the resize
actually causes, ``‖ΔW − ΔW_new‖/‖ΔW‖`` measured on the tensors as saved (after the dtype cast).
``sshs_*`` hashes are computed after the cast, so they match the file (sd-scripts v0.8.7 did not).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from networks.lora_family import check_same_family  # noqa: E402
from networks.lora_svd import (DYNAMIC_METHODS, dynamic_rank, module_delta, relative_error,  # noqa: E402
                               retention, svd_factors)
from networks.lora_tool_io import (check_inputs_exist, check_lora_output, complete_modules, module_alpha,  # noqa: E402
                                   precision_dtype, read_lora, save_lora)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Options of spec §9."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of the saved LoRA (default: float); sshs_* hashes describe the saved bytes")
    p.add_argument("--new_rank", type=int, default=4, help="target rank; the maximum rank in dynamic mode (default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="target rank of every 4-D (conv, 1x1 included) module (default: --new_rank)")
    p.add_argument("--save_to", type=str, default=None, help="output file (.ckpt, .pt, .pth or .safetensors)")
    p.add_argument("--model", type=str, default=None, help="LoRA to resize (.ckpt, .pt or .safetensors)")
    p.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda (default: cpu)")
    p.add_argument("--verbose", action="store_true",
                   help="print per module the retained sum(S) and Frobenius share, max(S) ratio and the relative "
                        "error the resize causes, then the means")
    p.add_argument("--dynamic_method", type=str, default=None, choices=[None, *DYNAMIC_METHODS],
                   help="choose each module's rank: sv_ratio (σ > σ0/param), sv_fro (Frobenius share >= param), "
                        "sv_cumulative (Σσ share >= param)")
    p.add_argument("--dynamic_param", type=float, default=None, help="the dynamic method's parameter")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it (wrappers import it)


@dataclass
class ModuleReport:
    """One line of the ``--verbose`` report."""

    name: str
    rank: int
    alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float
    rel_error: float  # ‖ΔW − ΔW_new‖ / ‖ΔW‖ on the saved tensors

    def line(self, dynamic: bool) -> str:
        text = (f"{self.name:75} | sum(S) retained: {self.sum_retained:.1%}, fro retained: "
                f"{self.fro_retained:.1%}, max(S) ratio: {self.max_ratio:0.1f}, rel. error: {self.rel_error:.6e}")
        return text + (f", dynamic | dim: {self.rank}, alpha: {self.alpha}" if dynamic else "")


def resize_module(parts: dict, name: str, new_rank: int, method: str | None, param: float | None,
                  save_dtype: torch.dtype, device: str | None) -> tuple[dict[str, torch.Tensor], ModuleReport]:
    """New tensors of one module (cast to ``save_dtype``) and its report line (spec §9 formulas)."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    alpha = module_alpha(parts)
    scale = 1.0 if alpha is None else alpha / down.shape[0]  # alpha missing -> scale 1 (§9)
    product = module_delta(up, down, None)  # up@down without alpha, float32 (§9)
    factors = svd_factors(product, new_rank, None, device)
    rank = min(dynamic_rank(factors.singular_values, method, param, new_rank), factors.rank)
    kept = retention(factors.singular_values, rank)
    new_down, new_up = factors.down[:rank], factors.up[:, :rank]
    new_alpha = float(scale * rank)
    out = {"alpha": torch.tensor(new_alpha).to(save_dtype), "lora_down.weight": new_down.to(save_dtype).contiguous(),
           "lora_up.weight": new_up.to(save_dtype).contiguous()}
    # the error the saved module causes: compare the effective deltas, alpha scaling included
    error = relative_error(product * scale, module_delta(out["lora_up.weight"], out["lora_down.weight"],
                                                         float(out["alpha"].float())))
    return out, ModuleReport(name, rank, new_alpha, kept.sum_retained, kept.fro_retained, kept.max_ratio, error)


def resize_state_dict(sd: dict, new_rank: int, new_conv_rank: int, method: str | None, param: float | None,
                      save_dtype: torch.dtype, device: str | None, path: str = "") -> tuple[dict, list[ModuleReport]]:
    """Every module resized (4-D modules to ``new_conv_rank``); other tensors kept (cast)."""
    out = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in sd.items()}
    reports = []
    with torch.no_grad():
        for name, parts in tqdm(complete_modules(sd, path).items(), desc="resizing", smoothing=0):
            rank = new_conv_rank if parts["lora_down.weight"].ndim == 4 else new_rank
            tensors, report = resize_module(parts, name, rank, method, param, save_dtype, device)
            out.update({f"{name}.{k}": v for k, v in tensors.items()})
            reports.append(report)
    return out, reports


def old_dim(sd: dict) -> int:
    """The input's rank as sd-scripts reports it: the first 2-D ``lora_down`` (else the first one)."""
    downs = [v for k, v in sd.items() if k.endswith("lora_down.weight")]
    two_d = [v for v in downs if v.ndim == 2]
    return (two_d or downs)[0].shape[0]


def resized_metadata(metadata: dict, args: argparse.Namespace, dim: int, reports: list[ModuleReport]) -> dict:
    """Input metadata with the §9 training comment and dim/alpha (last module's alpha, pitfall 5)."""
    metadata = dict(metadata)
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method is None:
        conv = "" if args.new_rank == args.new_conv_rank else f" (conv: {args.new_conv_rank})"
        metadata["ss_training_comment"] = f"dimension is resized from {dim} to {args.new_rank}{conv}; {comment}"
        metadata["ss_network_dim"] = str(args.new_rank)
        metadata["ss_network_alpha"] = str(reports[-1].alpha)
    else:
        metadata["ss_training_comment"] = (f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} "
                                           f"from {dim}; {comment}")
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
    # stale hashes of the input must not survive: the writer adds the new ones
    return {k: v for k, v in metadata.items() if not k.startswith("sshs_")}


def print_report(reports: list[ModuleReport], dynamic: bool) -> None:
    """``--verbose`` output: one line per module, then mean retention and mean/max relative error."""
    print()
    for r in reports:
        print(r.line(dynamic))
    fro = [r.fro_retained for r in reports if r.fro_retained == r.fro_retained]  # NaN for zero modules
    errors = [r.rel_error for r in reports]
    if fro:
        print(f"Average Frobenius norm retention: {statistics.mean(fro):.2%} | std: {statistics.pstdev(fro):0.3f}")
    print(f"Relative error caused: mean {statistics.mean(errors):.6e} | max {max(errors):.6e}")


def check_args(args: argparse.Namespace) -> None:
    if args.model is None:
        raise UserError("--model is required")
    check_inputs_exist([args.model], "--model")
    check_same_family([args.model], "--model")  # readable, and not a mix of SDXL and SD1/SD2 modules
    check_lora_output(args.save_to)
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be at least 1")
    if args.dynamic_method is not None and args.dynamic_param is None:
        raise UserError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param")
    if args.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < args.dynamic_param <= 1:
        raise UserError(f"--dynamic_param {args.dynamic_param}: {args.dynamic_method} expects a share in (0, 1]")
    if args.dynamic_method == "sv_ratio" and args.dynamic_param <= 0:
        raise UserError(f"--dynamic_param {args.dynamic_param}: sv_ratio expects a positive ratio")


def resize(args: argparse.Namespace) -> list[ModuleReport]:
    """1. read  2. resize every module  3. metadata  4. save (cast, then hash)."""
    check_args(args)
    if args.new_conv_rank is None:
        args.new_conv_rank = args.new_rank
    save_dtype = precision_dtype(args.save_precision, "--save_precision", torch.float32)
    sd, metadata = read_lora(args.model, torch.float32)
    dim = old_dim(sd)
    out, reports = resize_state_dict(sd, args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param,
                                     save_dtype, args.device, args.model)
    if args.verbose:
        print_report(reports, args.dynamic_method is not None)
    save_lora(out, args.save_to, None, resized_metadata(metadata, args, dim, reports))
    logger.info("resized LoRA saved to %s", args.save_to)
    return reports


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    resize(args)


if __name__ == "__main__":
    main()
