"""FLUX.1 transformer key table: diffusers ``FluxTransformer2DModel`` <-> BFL single file (``flux1-dev.safetensors``).

Built from the model's own keys, like the SD tables, so one table serves both directions and a round trip
is exact. BFL packs what diffusers keeps apart: a double block's ``img_attn.qkv`` / ``txt_attn.qkv`` are
cat(q, k, v); a single block's ``linear1`` is cat(q, k, v, mlp) (unequal rows: ``split``); the final
adaLN stores (shift, scale) where diffusers' ``AdaLayerNormContinuous`` expects (scale, shift) (``swap``).
"""
from __future__ import annotations

import re
from typing import Mapping

from .key_rules import KeyRule, check_bijective

# BFL files saved by ComfyUI and others carry this prefix; the tables use the bare names
BFL_PREFIX = "model.diffusion_model."

_TOP = {  # diffusers module -> BFL module
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_DOUBLE = {  # inside transformer_blocks.N -> inside double_blocks.N
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_PACKED = {  # (module, position in the packed tensor) -> packed BFL module
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_PACKED = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
                  "proj_mlp": ("linear1", 3)}
_NORMS = {  # RMSNorm weights: diffusers `weight`, BFL `scale`
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def _module_and_param(rest: str) -> tuple[str, str]:
    module, _, param = rest.rpartition(".")
    return module, param


def _block_target(kind: str, index: str, rest: str) -> tuple[str, int | None]:
    """(BFL key, position in a packed tensor or None) of one key inside a block."""
    double = kind == "transformer_blocks"
    head = f"{'double' if double else 'single'}_blocks.{index}."
    norms = _NORMS if double else _SINGLE_NORMS
    if rest in norms:
        return head + norms[rest], None
    module, param = _module_and_param(rest)
    plain, packed = (_DOUBLE, _DOUBLE_PACKED) if double else (_SINGLE, _SINGLE_PACKED)
    if module in plain:
        return f"{head}{plain[module]}.{param}", None
    if module in packed:
        name, pos = packed[module]
        return f"{head}{name}.{param}", pos
    raise KeyError(f"FLUX transformer key {kind}.{index}.{rest!r} has no BFL counterpart")


def _target(key: str) -> tuple[str, int | None]:
    m = _BLOCK.fullmatch(key)
    if m:
        return _block_target(*m.groups())
    module, param = _module_and_param(key)
    if module in _TOP:
        return f"{_TOP[module]}.{param}", None
    raise KeyError(f"FLUX transformer key {key!r} has no BFL counterpart")


def flux_rules(shapes: Mapping[str, tuple]) -> list[KeyRule]:
    """Rules for every tensor of a ``FluxTransformer2DModel`` given its state-dict shapes (key -> shape).

    ``split`` rules record each part's rows, so a BFL ``linear1`` splits into q, k, v and mlp of any width.
    """
    packed: dict[str, dict[int, str]] = {}
    rules: list[KeyRule] = []
    for k in shapes:
        bfl, pos = _target(k)
        if pos is None:
            rules.append(KeyRule((k,), bfl, "swap" if bfl.startswith("final_layer.adaLN_modulation.") else "copy"))
        else:
            packed.setdefault(bfl, {})[pos] = k
    for bfl, parts in packed.items():
        keys = tuple(parts[i] for i in sorted(parts))
        if len(keys) == 3:
            rules.append(KeyRule(keys, bfl, "qkv"))
        else:
            rules.append(KeyRule(keys, bfl, "split", tuple(int(shapes[k][0]) for k in keys)))
    check_bijective(rules)
    return rules
