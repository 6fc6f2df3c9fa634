"""Block-wise ranks and learning-rate weights of ``networks.lora`` (spec cli-options §12, ``--network_args``).

Only SD1/SD2 U-Net names have a block index; every other module uses index -1, i.e. the last list
entry for dims and weight 1.0 for LRs (spec file-formats pitfall 2), exactly as sd-scripts does.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

from library.errors import UserError

from .lora_targets import NUM_OF_BLOCKS, block_index

logger = logging.getLogger(__name__)

NUM_TOTAL_BLOCKS = NUM_OF_BLOCKS * 2 + 1  # 12 down, 1 mid, 12 up
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


@dataclass
class BlockLRWeights:
    """LR multipliers: ``down``/``up`` 12 entries each (index = block index within the half), ``mid`` one."""

    down: list[float] | None
    mid: float | None
    up: list[float] | None

    def weight_of(self, lora_name: str) -> float:
        """LR multiplier of one module; 1.0 outside the SD1/SD2 U-Net blocks."""
        idx = block_index(lora_name)
        if idx < 0:
            return 1.0
        if idx < NUM_OF_BLOCKS:
            return self.down[idx] if self.down is not None else 1.0
        if idx == NUM_OF_BLOCKS:
            return self.mid if self.mid is not None else 1.0
        return self.up[idx - NUM_OF_BLOCKS - 1] if self.up is not None else 1.0


def _parse_list(key: str, text: str, kind: type, length: int) -> list:
    try:
        values = [kind(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--network_args {key}={text!r}: expected {length} comma-separated numbers") from None
    if len(values) != length:
        raise UserError(f"--network_args {key} must have {length} elements, got {len(values)}")
    return values


def preset_weights(spec: str) -> list[float]:
    """``cosine``/``sine``/``linear``/``reverse_linear``/``zeros`` with optional ``+base`` -> 12 weights."""
    name, _, base_text = spec.partition("+")
    try:
        base = float(base_text) if base_text else 0.0
    except ValueError:
        raise UserError(f"--network_args lr weight {spec!r}: base after '+' must be a number") from None
    n = NUM_OF_BLOCKS
    ramp = [i / (n - 1) for i in range(n)]
    curves = {
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * n,
    }
    if name not in curves:
        raise UserError(f"--network_args lr weight {spec!r}: unknown preset, use one of {', '.join(LR_PRESETS)}")
    return [v + base for v in curves[name]]


def _half_weights(key: str, text: str | None) -> list[float] | None:
    """12 LR weights from a comma list (empty item -> 0, short list padded with 1.0) or a preset."""
    if text is None:
        return None
    if "," not in text:
        return preset_weights(text)
    try:
        values = [float(s) if s else 0.0 for s in text.split(",")]
    except ValueError:
        raise UserError(f"--network_args {key}={text!r}: expected comma-separated numbers") from None
    if len(values) > NUM_OF_BLOCKS:
        logger.warning("%s has more than %d entries; the rest are ignored", key, NUM_OF_BLOCKS)
    return (values + [1.0] * NUM_OF_BLOCKS)[:NUM_OF_BLOCKS]


def parse_block_lr_weights(kwargs: Mapping[str, str]) -> BlockLRWeights | None:
    """``down_lr_weight``/``mid_lr_weight``/``up_lr_weight`` with ``block_lr_zero_threshold``; None if unset."""
    down_text, mid_text, up_text = (kwargs.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    if down_text is None and mid_text is None and up_text is None:
        return None
    threshold = float(kwargs.get("block_lr_zero_threshold", 0.0) or 0.0)
    down = _half_weights("down_lr_weight", down_text)
    up = _half_weights("up_lr_weight", up_text)
    mid = float(mid_text) if mid_text is not None else None
    # weights at or below the threshold become 0: those blocks get no modules at all
    down = [w if w > threshold else 0.0 for w in down] if down is not None else None
    up = [w if w > threshold else 0.0 for w in up] if up is not None else None
    mid = (mid if mid > threshold else 0.0) if mid is not None else None
    return BlockLRWeights(down, mid, up)


@dataclass
class BlockDims:
    """Per-block (dim, alpha) for Linear/1x1 and for k x k convs (conv lists None = no conv modules)."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None

    def dim_alpha(self, lora_name: str, is_conv_kxk: bool) -> tuple[int | None, float | None]:
        idx = block_index(lora_name)  # -1 picks the last entry, as sd-scripts does (pitfall 2)
        if not is_conv_kxk:
            return self.dims[idx], self.alphas[idx]
        if self.conv_dims is None:
            return None, None
        return self.conv_dims[idx], self.conv_alphas[idx]


def parse_block_dims(kwargs: Mapping[str, str], network_dim: int, network_alpha: float,
                     conv_dim: int | None, conv_alpha: float | None,
                     lr_weights: BlockLRWeights | None) -> BlockDims:
    """25-entry dims/alphas (missing lists filled with the network values), zeroed where the LR weight is 0."""
    n = NUM_TOTAL_BLOCKS
    get = kwargs.get
    dims = _parse_list("block_dims", get("block_dims"), int, n) if get("block_dims") else [network_dim] * n
    alphas = _parse_list("block_alphas", get("block_alphas"), float, n) if get("block_alphas") else [network_alpha] * n
    conv_dims = conv_alphas = None
    if get("conv_block_dims"):
        conv_dims = _parse_list("conv_block_dims", get("conv_block_dims"), int, n)
        conv_alphas = (_parse_list("conv_block_alphas", get("conv_block_alphas"), float, n)
                       if get("conv_block_alphas") else [conv_alpha if conv_alpha is not None else 1.0] * n)
    elif conv_dim is not None:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha] * n
    if lr_weights is not None:
        zero = [i for i, w in enumerate(lr_weights.down or []) if w == 0]
        zero += [NUM_OF_BLOCKS] if lr_weights.mid == 0 else []
        zero += [NUM_OF_BLOCKS + 1 + i for i, w in enumerate(lr_weights.up or []) if w == 0]
        for i in zero:
            dims[i] = 0
            if conv_dims is not None:
                conv_dims[i] = 0
    return BlockDims(dims, alphas, conv_dims, conv_alphas)
