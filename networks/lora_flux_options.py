"""``--network_args`` of the FLUX.1 LoRA (sd-scripts' networks/lora_flux.py), parsed from strings once.

Which layers train: ``train_blocks`` (all / single / double), ``train_double_block_indices`` /
``train_single_block_indices`` ("all", "none", "0,3-5"), ``in_dims`` (ranks of the img, time, vector,
guidance, txt embedders), ``train_t5xxl``; ranks per layer type (``img_attn_dim`` … ``single_mod_dim``) and
per regular expression (``network_reg_dims``). Options sd-scripts' FLUX LoRA has and this one has not are
refused in one line, as are SD U-Net options that mean nothing for FLUX.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from library.errors import UserError

# rank options per layer type, with the name parts that pick a layer (first match wins, as upstream)
TYPE_DIMS = (("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)), ("img_mlp_dim", ("img_mlp",)),
             ("txt_mlp_dim", ("txt_mlp",)), ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
             ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",)))
_NOT_HERE = {
    "split_qkv": "its files are the fused q|k|v layout anyway; train without it",
    "ggpo_beta": "LoRA-GGPO is not implemented here", "ggpo_sigma": "LoRA-GGPO is not implemented here",
    "network_reg_lrs": "per-layer learning rates are not implemented for FLUX.1 here",
    "loraplus_lr_ratio": "LoRA+ is not implemented for FLUX.1 here",
    "loraplus_unet_lr_ratio": "LoRA+ is not implemented for FLUX.1 here",
    "loraplus_text_encoder_lr_ratio": "LoRA+ is not implemented for FLUX.1 here",
}
_SD_ONLY = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
            "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")


@dataclass(frozen=True)
class FluxLoRAOptions:
    """Which FLUX layers get a module and with which rank (``None`` fields: sd-scripts' defaults)."""

    train_blocks: str = "all"
    train_t5xxl: bool = False
    in_dims: tuple[int, ...] | None = None
    type_dims: tuple[tuple[tuple[str, ...], int], ...] = ()
    double_indices: str | None = None
    single_indices: str | None = None
    reg_dims: tuple[tuple[str, int], ...] = ()
    verbose: bool = False


def _flag(kwargs: Mapping[str, Any], key: str) -> bool:
    value = kwargs.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value) not in ("True", "False"):
        raise UserError(f"--network_args {key}={value!r}: expected True or False")
    return str(value) == "True"


def _int(key: str, value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UserError(f"--network_args {key}={value!r}: expected a whole number") from None
    if number < 0:
        raise UserError(f"--network_args {key}={value!r}: a rank cannot be negative")
    return number


def _in_dims(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    dims = tuple(_int("in_dims", d) for d in text.split(","))
    if len(dims) != 5:
        raise UserError(f"--network_args in_dims={value!r}: give 5 ranks (img, time, vector, guidance, txt)")
    return dims


def _reg_dims(value: Any) -> tuple[tuple[str, int], ...]:
    """``"regex=rank,regex=rank"``; a bad item or expression is an error (upstream only warns)."""
    pairs = []
    for item in str(value or "").split(","):
        if not item.strip():
            continue
        pattern, sep, rank = item.partition("=")
        if not sep:
            raise UserError(f"--network_args network_reg_dims item {item.strip()!r} is not regex=rank")
        try:
            re.compile(pattern.strip())
        except re.error as e:
            raise UserError(f"--network_args network_reg_dims {pattern.strip()!r}: not a regular expression ({e})") \
                from None
        pairs.append((pattern.strip(), _int("network_reg_dims", rank)))
    return tuple(pairs)


def parse_flux_options(kwargs: Mapping[str, Any]) -> FluxLoRAOptions:
    """The FLUX-specific ``--network_args``; unsupported or SD-only ones are a ``UserError``."""
    for key, why in _NOT_HERE.items():
        if kwargs.get(key) is not None and not (key == "split_qkv" and str(kwargs[key]) == "False"):
            raise UserError(f"--network_args {key}: not supported by the FLUX.1 LoRA here ({why})")
    for key in _SD_ONLY:
        if kwargs.get(key) is not None:
            raise UserError(f"--network_args {key}: an SD U-Net option; the FLUX.1 LoRA has no conv layers or "
                            "U-Net blocks (use train_blocks / train_double_block_indices / *_dim)")
    train_blocks = str(kwargs.get("train_blocks") or "all")
    if train_blocks not in ("all", "single", "double"):
        raise UserError(f"--network_args train_blocks={train_blocks!r}: expected all, single or double")
    type_dims = tuple((parts, _int(key, kwargs[key])) for key, parts in TYPE_DIMS if kwargs.get(key) is not None)
    return FluxLoRAOptions(train_blocks=train_blocks, train_t5xxl=_flag(kwargs, "train_t5xxl"),
                           in_dims=_in_dims(kwargs.get("in_dims")), type_dims=type_dims,
                           double_indices=kwargs.get("train_double_block_indices"),
                           single_indices=kwargs.get("train_single_block_indices"),
                           reg_dims=_reg_dims(kwargs.get("network_reg_dims")), verbose=_flag(kwargs, "verbose"))


def parse_block_selection(selection: str, total: int, key: str) -> list[bool]:
    """``"all"``, ``"none"``/``""`` or comma-separated indices and ranges (``"0,3-5"``) over ``total`` blocks."""
    text = str(selection).strip()
    if text == "all":
        return [True] * total
    if text in ("none", ""):
        return [False] * total
    chosen = [False] * total
    for part in text.split(","):
        start, sep, end = part.partition("-")
        try:
            low, high = int(start), int(end if sep else start)
        except ValueError:
            raise UserError(f"--network_args {key}={selection!r}: {part.strip()!r} is not an index or a range") \
                from None
        if not 0 <= low <= high < total:
            raise UserError(f"--network_args {key}={selection!r}: {part.strip()!r} is outside 0-{total - 1} "
                            f"(the model has {total} such blocks)")
        for i in range(low, high + 1):
            chosen[i] = True
    return chosen
