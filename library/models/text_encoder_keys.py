"""Text-encoder key tables: transformers CLIP <-> LDM (HF layout or OpenCLIP layout), spec file-formats §f.

transformers >= 5.6 dropped ``text_model.`` from ``CLIPTextModel``'s own names (pitfall 11); the file
formats keep it, so the prefix is added or stripped here whatever the installed version does.
"""
from __future__ import annotations

import re
from typing import Iterable

from .key_rules import KeyRule, check_bijective

_TM = "text_model."


def _inner(key: str) -> str:
    return key[len(_TM):] if key.startswith(_TM) else key


def hf_clip_rules(model_keys: Iterable[str]) -> list[KeyRule]:
    """SD1 / SDXL TE1: LDM stores the HF names, always with ``text_model.``."""
    rules = []
    for k in model_keys:
        if k.endswith("position_ids"):
            continue
        inner = _inner(k)
        ldm = inner if inner.startswith("text_projection") else _TM + inner
        rules.append(KeyRule((k,), ldm))
    check_bijective(rules)
    return rules


_OPENCLIP_SIMPLE = [
    (r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(\w+)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(\w+)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(\w+)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(\w+)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"final_layer_norm\.(\w+)", r"ln_final.\1"),
]
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def open_clip_rules(model_keys: Iterable[str]) -> list[KeyRule]:
    """SD2 TE and SDXL TE2: OpenCLIP layout with packed q/k/v (``in_proj_weight`` = cat(q, k, v))."""
    keys = [k for k in model_keys if not k.endswith("position_ids")]
    by_inner = {_inner(k): k for k in keys}
    rules: list[KeyRule] = []
    packed: set[tuple[str, str]] = set()
    for k in keys:
        inner = _inner(k)
        if inner == "text_projection.weight":
            # correct convention (pitfall 12): HF weight = OpenCLIP matrix transposed
            rules.append(KeyRule((k,), "text_projection", "transpose"))
            continue
        m = _QKV.fullmatch(inner)
        if m:
            layer, _, param = m.groups()
            if (layer, param) not in packed:
                packed.add((layer, param))
                group = tuple(by_inner[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv")
                rules.append(KeyRule(group, f"transformer.resblocks.{layer}.attn.in_proj_{param}", "qkv"))
            continue
        for pat, repl in _OPENCLIP_SIMPLE:
            if re.fullmatch(pat, inner):
                rules.append(KeyRule((k,), re.sub(pat, repl, inner)))
                break
        else:
            raise KeyError(f"text-encoder key {k!r} has no OpenCLIP counterpart")
    check_bijective(rules)
    return rules
