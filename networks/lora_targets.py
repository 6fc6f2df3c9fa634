"""Which layers a kohya LoRA adapts and how they are named: spec file-formats §a.1, pitfalls 1, 3, 4, 11.

Targets are found by path (text encoders) and by base-class name (U-Net), never by exact class-name
lists that library upgrades rename; the target lists are tuples chosen per call, never mutated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from library.models.unet_keys import unet_rules

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"
PREFIX_TE1 = "lora_te1"
PREFIX_TE2 = "lora_te2"

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# CLIP attention and MLP of every encoder layer, whatever transformers calls their classes (pitfall 3)
_TE_PARENT = re.compile(r"(^|\.)encoder\.layers\.\d+\.(self_attn|mlp)$")


@dataclass(frozen=True)
class Target:
    """One adaptable layer: its kohya name, the layer, and whether it is a k x k (k > 1) conv."""

    lora_name: str
    module: nn.Module
    is_unet: bool

    @property
    def is_conv_kxk(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _adaptable(parent: nn.Module):
    for name, child in parent.named_modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            yield name, child


def te_prefixes(count: int) -> list[str]:
    """``lora_te`` for one text encoder, ``lora_te1``/``lora_te2`` for SDXL's two."""
    return [PREFIX_TE] if count == 1 else [f"{PREFIX_TE}{i + 1}" for i in range(count)]


def te_path(path: str) -> str:
    """Module path as the format names it: always under ``text_model.`` (pitfall 11)."""
    return path if path.startswith("text_model.") else "text_model." + path


def text_encoder_targets(prefix: str, text_encoder: nn.Module) -> list[Target]:
    """Every Linear/Conv2d inside each CLIP layer's ``self_attn`` and ``mlp``, in module order."""
    targets = []
    for name, parent in text_encoder.named_modules():
        if not _TE_PARENT.search(name):
            continue
        for child_name, child in _adaptable(parent):
            path = te_path(f"{name}.{child_name}")
            targets.append(Target(f"{prefix}.{path}".replace(".", "_"), child, False))
    return targets


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL U-Nets carry size conditioning (``addition_embed_type='text_time'``)."""
    config = getattr(unet, "config", None)
    return config is not None and config.get("addition_embed_type") == "text_time"


def _sdxl_names(unet: nn.Module, paths: list[str]) -> dict[str, str]:
    """Diffusers module path -> LDM path for SDXL LoRA names (pitfall 1), via the models' key table."""
    rules = unet_rules([p + ".weight" for p in paths], unet.config)
    return {rule.model_keys[0][: -len(".weight")]: rule.ldm_key[: -len(".weight")] for rule in rules}


def unet_layers(unet: nn.Module, classes: Iterable[str], prefix: str,
                accept: Callable[[nn.Module], bool] = lambda layer: True) -> list[Target]:
    """Every Linear/Conv2d inside a module of one of ``classes`` that ``accept`` takes, named ``prefix`` + path
    (the LDM path for SDXL, pitfall 1). Shared by the LoRA family and OFT, whose files differ only in prefix."""
    classes = set(classes)
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, parent in unet.named_modules():
        if not (_class_names(parent) & classes):
            continue
        for child_name, child in _adaptable(parent):
            if id(child) not in seen and accept(child):  # a target nested in another target is adapted once
                seen.add(id(child))
                found.append((f"{name}.{child_name}", child))
    rename = _sdxl_names(unet, [p for p, _ in found]) if is_sdxl_unet(unet) else {}
    return [Target(f"{prefix}.{rename.get(p, p)}".replace(".", "_"), m, True) for p, m in found]


def unet_targets(unet: nn.Module, include_conv: bool) -> list[Target]:
    """Layers inside Transformer2DModel (and ResnetBlock2D/Downsample2D/Upsample2D with ``include_conv``)."""
    return unet_layers(unet, UNET_TARGETS + (UNET_CONV_TARGETS if include_conv else ()), PREFIX_UNET)


def target_layers(text_encoders, unet: nn.Module | None) -> dict[str, nn.Module]:
    """LoRA module name -> the layer it adapts, for every layer a kohya file may name (TE + U-Net C3Lier set)."""
    encoders = [te for te in (text_encoders if isinstance(text_encoders, (list, tuple)) else [text_encoders])
                if te is not None]
    layers = {t.lora_name: t.module for prefix, te in zip(te_prefixes(len(encoders)), encoders)
              for t in text_encoder_targets(prefix, te)}
    if unet is not None:
        layers.update({t.lora_name: t.module for t in unet_targets(unet, include_conv=True)})
    return layers


def target_weight_shapes(text_encoders, unet: nn.Module | None) -> dict[str, tuple[int, ...]]:
    """``{LoRA module name: weight shape}`` of :func:`target_layers`, what the family checks compare against."""
    return {name: tuple(layer.weight.shape) for name, layer in target_layers(text_encoders, unet).items()}


NUM_OF_BLOCKS = 12  # down/up blocks of the 25-entry block lists (12 down, 1 mid, 12 up)
_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_index(lora_name: str) -> int:
    """Block index 0..24 of an SD1/SD2 U-Net LoRA name; -1 for TE, SDXL and other names (cli-options §12)."""
    m = _RE_UPDOWN.search(lora_name)
    if m:
        direction, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + 2 if kind in ("upsamplers", "downsamplers") else 3 * i + j
        return 1 + idx if direction == "down" else NUM_OF_BLOCKS + 1 + idx
    if "mid_block_" in lora_name:
        return NUM_OF_BLOCKS
    return -1
