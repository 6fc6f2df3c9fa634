"""``--block_lr``: one learning rate per U-Net block of SDXL, as sdxl_train.py groups them.

sd-scripts numbers the 23 blocks by its own (LDM) U-Net's parameter names: 0 = ``time_embed`` and
``label_emb``, 1-9 = ``input_blocks.0``-``8``, 10-12 = ``middle_block.0``-``2``, 13-21 =
``output_blocks.0``-``8``, 22 = ``out``. Our U-Net is diffusers', so each parameter's LDM block comes from the
same Diffusers -> LDM block table the checkpoint conversion uses (``library.models.unet_keys``). A block whose
rate is 0 is left out of the optimizer (it still gets gradients: sd-scripts leaves ``requires_grad`` on too).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from library.errors import UserError
from library.models.unet_keys import unet_block_map

UNET_NUM_BLOCKS_FOR_BLOCK_LR = 23
_LDM_BLOCK_BASE = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}


def parse_block_lr(text: Optional[str]) -> Optional[list[float]]:
    """``"1e-6,2e-6,..."`` -> 23 floats (None when the option is not given); one line naming the problem."""
    if not text:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise UserError(f"--block_lr: {bad!r} is not a number") from None
    if len(values) != UNET_NUM_BLOCKS_FOR_BLOCK_LR:
        raise UserError(f"--block_lr must have {UNET_NUM_BLOCKS_FOR_BLOCK_LR} comma-separated values (one per U-Net "
                        f"block), got {len(values)}")
    if any(v < 0 for v in values):
        raise UserError("--block_lr: a learning rate cannot be negative (0 leaves the block untrained)")
    return values


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def ldm_block_index(ldm_name: str) -> int:
    """sd-scripts' block number (0-22) of an LDM U-Net parameter name."""
    head, _, rest = ldm_name.partition(".")
    if head in ("time_embed", "label_emb"):
        return 0
    if head in _LDM_BLOCK_BASE:
        return _LDM_BLOCK_BASE[head] + int(rest.split(".")[0])
    if head == "out":
        return 22
    raise ValueError(f"unexpected U-Net parameter name: {ldm_name}")


def block_index_of(name: str, block_map: Mapping[str, tuple[str, str]]) -> int:
    """Block number of a diffusers U-Net parameter (``down_blocks.1.attentions.0....`` -> 5)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest Diffusers block prefix that names this parameter
        head = ".".join(parts[:cut])
        if head in block_map:
            return ldm_block_index(block_map[head][0])
    raise ValueError(f"unexpected U-Net parameter name: {name}")


def block_param_groups(unet: torch.nn.Module, block_lrs: Sequence[float]) -> tuple[list[dict], list[str]]:
    """Param groups ``{"params", "lr"}`` in block order, blocks at lr 0 left out; with their log names
    (``lr/block<i>``, sd-scripts' names)."""
    block_map = unet_block_map(unet.config)
    blocks: list[list[torch.nn.Parameter]] = [[] for _ in range(UNET_NUM_BLOCKS_FOR_BLOCK_LR)]
    for name, param in unet.named_parameters():
        blocks[block_index_of(name, block_map)].append(param)
    groups, names = [], []
    for i, (params, lr) in enumerate(zip(blocks, block_lrs)):
        if lr == 0 or not params:
            continue
        groups.append({"params": params, "lr": lr})
        names.append(f"lr/block{i}")
    return groups, names
