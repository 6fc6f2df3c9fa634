"""Which layers a FLUX.1 LoRA adapts and how sd-scripts names them (networks/lora_flux.py upstream).

Names are ``lora_unet_`` + the BFL module path with ``.`` -> ``_`` (``lora_unet_double_blocks_0_img_attn_qkv``),
``lora_te1_`` + the CLIP-L path, ``lora_te3_`` + the T5 path. Our transformer is diffusers'
``FluxTransformer2DModel``: each BFL layer is found through the model key table (``library.models.flux_keys``),
so a fused BFL layer (``img_attn.qkv``, ``linear1``) lists the diffusers layers its rows split into.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from library.models.flux_keys import flux_rules

from .lora_targets import text_encoder_targets

PREFIX_FLUX = "lora_unet"  # ComfyUI-compatible prefix, as sd-scripts chose
PREFIX_CLIP = "lora_te1"
PREFIX_T5 = "lora_te3"

# the Linear layers of BFL's DoubleStreamBlock / SingleStreamBlock, in their module order
DOUBLE_LAYERS = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                 "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
SINGLE_LAYERS = ("linear1", "linear2", "modulation.lin")
# the embedders sd-scripts' ``in_dims`` adapts: (img, time, vector, guidance, txt), each with its layers
IN_GROUPS = (("img_in",), ("time_in.in_layer", "time_in.out_layer"), ("vector_in.in_layer", "vector_in.out_layer"),
             ("guidance_in.in_layer", "guidance_in.out_layer"), ("txt_in",))
_T5_PARENT = re.compile(r"^encoder\.block\.\d+\.layer\.\d+\.(SelfAttention|DenseReluDense)$")


@dataclass(frozen=True)
class FluxTarget:
    """One adaptable layer as the file names it, and the model layers it is (several for a fused BFL layer).

    ``kind``: ``double``/``single`` (block layers, with ``block`` index), ``in`` (embedders, ``block`` = index
    into ``IN_GROUPS``), ``te1`` (CLIP-L) or ``te3`` (T5-XXL)."""

    lora_name: str
    layers: tuple[nn.Module, ...]
    kind: str
    block: int = -1

    @property
    def is_unet(self) -> bool:
        return self.kind in ("double", "single", "in")

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return sum(layer.out_features for layer in self.layers)


def lora_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def bfl_layer_map(transformer: nn.Module) -> dict[str, tuple[str, ...]]:
    """BFL Linear path (``double_blocks.0.img_attn.qkv``) -> the diffusers Linear paths it stacks, in row order."""
    shapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items() if k.endswith(".weight")}
    found: dict[str, tuple[str, ...]] = {}
    for rule in flux_rules(shapes):
        if len(shapes[rule.model_keys[0]]) == 2:  # Linear weights (RMSNorm scales are 1-D)
            found[rule.ldm_key[: -len(".weight")]] = tuple(k[: -len(".weight")] for k in rule.model_keys)
    return found


def transformer_targets(transformer: nn.Module) -> list[FluxTarget]:
    """Every layer a FLUX LoRA may name: double blocks, single blocks, then the embedders (sd-scripts' order)."""
    layer_map = bfl_layer_map(transformer)
    modules = dict(transformer.named_modules())
    config = transformer.config

    def target(bfl: str, kind: str, block: int) -> FluxTarget | None:
        paths = layer_map.get(bfl)
        if paths is None:
            return None  # guidance_in of schnell
        return FluxTarget(lora_name(PREFIX_FLUX, bfl), tuple(modules[p] for p in paths), kind, block)

    targets = [target(f"double_blocks.{i}.{name}", "double", i)
               for i in range(config.num_layers) for name in DOUBLE_LAYERS]
    targets += [target(f"single_blocks.{i}.{name}", "single", i)
                for i in range(config.num_single_layers) for name in SINGLE_LAYERS]
    targets += [target(name, "in", group) for group, names in enumerate(IN_GROUPS) for name in names]
    return [t for t in targets if t is not None]


def clip_targets(clip_l: nn.Module) -> list[FluxTarget]:
    """CLIP-L attention and MLP Linear layers, named as for SDXL's first text encoder (``lora_te1_text_model_…``)."""
    return [FluxTarget(t.lora_name, (t.module,), "te1") for t in text_encoder_targets(PREFIX_CLIP, clip_l)]


def t5_targets(t5: nn.Module) -> list[FluxTarget]:
    """T5 self-attention (q, k, v, o) and gated MLP (wi_0, wi_1, wo) of every block: ``lora_te3_encoder_block_…``."""
    targets = []
    for name, parent in t5.named_modules():
        if not _T5_PARENT.match(name):
            continue
        for child_name, child in parent.named_modules():
            if isinstance(child, nn.Linear):
                targets.append(FluxTarget(lora_name(PREFIX_T5, f"{name}.{child_name}"), (child,), "te3"))
    return targets


def all_targets(text_encoders, transformer: nn.Module | None) -> dict[str, FluxTarget]:
    """LoRA module name -> target for every layer a FLUX LoRA file may name (CLIP-L, T5, transformer)."""
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    encoders += [None] * (2 - len(encoders))
    found = clip_targets(encoders[0]) if encoders[0] is not None else []
    found += t5_targets(encoders[1]) if encoders[1] is not None else []
    found += transformer_targets(transformer) if transformer is not None else []
    return {t.lora_name: t for t in found}
