#!/usr/bin/env python
"""Cut LoRAs of rank unit, 2·unit, … (below the trained rank) out of a DyLoRA file: sd-scripts'
``networks/extract_lora_from_dylora.py``.

A DyLoRA trains its first units to work on their own, so the rank-r LoRA is the first r rows of every
``lora_down`` and the first r columns of every ``lora_up``, alpha unchanged (as upstream). Each output is
``<save_to stem>-<rank:04d><ext>`` with the input's metadata, ``ss_network_dim`` set to the rank and the comment
``split from DyLoRA, rank R to r; …``; ``sshs_*`` hashes describe each written file (upstream wrote them into
the input's metadata instead, so its outputs carried none).

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to lora.safetensors --unit 4
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from networks.lora_family import check_same_family  # noqa: E402
from networks.lora_tool_io import check_inputs_exist, check_lora_output, read_lora, save_lora  # noqa: E402

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unit", type=int, default=None, help="rank step of the LoRAs to cut (the DyLoRA's unit)")
    p.add_argument("--save_to", type=str, default=None,
                   help="base output name (.ckpt, .pt, .pth or .safetensors); -<rank> is added before the extension")
    p.add_argument("--model", type=str, default=None, help="the DyLoRA file (.ckpt, .pt or .safetensors)")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it


def max_rank(sd: dict[str, torch.Tensor]) -> int:
    return max(v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight"))


def cut(sd: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` units of every module; alphas as they are."""
    out = {}
    for key, value in sd.items():
        if key.endswith("lora_down.weight"):
            out[key] = value[:rank].contiguous()
        elif key.endswith("lora_up.weight"):
            out[key] = value[:, :rank].contiguous()
        else:
            out[key] = value
    return out


def output_path(save_to: str, rank: int) -> str:
    stem, ext = os.path.splitext(save_to)
    return f"{stem}-{rank:04d}{ext}"


def check_args(args: argparse.Namespace) -> None:
    if args.model is None:
        raise UserError("--model is required")
    check_inputs_exist([args.model], "--model")
    check_same_family([args.model], "--model")
    check_lora_output(args.save_to)
    if args.unit is None or args.unit < 1:
        raise UserError("--unit is required and must be at least 1 (the DyLoRA's unit)")


def split(args: argparse.Namespace) -> list[str]:
    """Write every cut; returns the paths written."""
    check_args(args)
    sd, metadata = read_lora(args.model)
    full = max_rank(sd)
    ranks = list(range(args.unit, full, args.unit))
    if not ranks:
        raise UserError(f"--unit {args.unit}: the DyLoRA's rank is {full}, so there is no smaller rank to cut")
    comment = metadata.get("ss_training_comment", "")
    written = []
    for rank in tqdm(ranks, desc="ranks"):
        meta = dict(metadata)
        meta["ss_training_comment"] = f"split from DyLoRA, rank {full} to {rank}; {comment}"
        meta["ss_network_dim"] = str(rank)
        path = output_path(args.save_to, rank)
        save_lora(cut(sd, rank), path, None, meta)
        logger.info("rank %d saved to %s", rank, path)
        written.append(path)
    return written


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    return split(args)


if __name__ == "__main__":
    main()
