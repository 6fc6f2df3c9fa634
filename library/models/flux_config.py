"""FLUX.1 model files: recognising them and inferring every config from tensor shapes.

A BFL single file carries no config, so sizes are read from shapes (tiny test models load through the
same path): depths from the block indices, widths from the projections, dev vs schnell from whether
``guidance_in`` exists (as sd-scripts' ``flux_utils.analyze_checkpoint_state`` decides). The rotary
axes are not in the weights: the released models split a 128-wide head as (16, 56, 56); other head
widths keep those proportions.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from library.errors import UserError

from .flux_keys import BFL_PREFIX

Shapes = Mapping[str, tuple]
_MARKER = "double_blocks.0.img_attn.qkv.weight"
T5_TOKENIZER_HUB_ID = "google/t5-v1_1-xxl"  # sd-scripts' id; the cache folder is the id with "/" -> "_"


def bfl_prefix(keys: Iterable[str]) -> str | None:
    """"" or ``model.diffusion_model.`` when the keys hold a BFL FLUX transformer, else None."""
    keys = set(keys)
    for prefix in ("", BFL_PREFIX):
        if prefix + _MARKER in keys:
            return prefix
    return None


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """(16, 56, 56) for the released 128-wide heads; the same proportions for others (each axis even)."""
    if head_dim % 32:
        raise UserError(f"FLUX attention heads of width {head_dim}: the rotary axes need a multiple of 32")
    return head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16


def infer_flux_config(s: Shapes, path: str = "checkpoint") -> dict:
    """``FluxTransformer2DModel`` config from BFL shapes (keys without prefix)."""
    try:
        hidden, in_channels = s["img_in.weight"]
        head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        cfg = {
            "patch_size": 1,
            "in_channels": in_channels,
            "out_channels": s["final_layer.linear.weight"][0],
            "num_layers": _count(s, r"double_blocks\.(\d+)\."),
            "num_single_layers": _count(s, r"single_blocks\.(\d+)\."),
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "joint_attention_dim": s["txt_in.weight"][1],
            "pooled_projection_dim": s["vector_in.in_layer.weight"][1],
            "guidance_embeds": "guidance_in.in_layer.weight" in s,
            "axes_dims_rope": rope_axes(head_dim),
        }
        mlp = s["double_blocks.0.img_mlp.0.weight"][0]
    except KeyError as e:
        raise UserError(f"{path}: not a complete FLUX.1 transformer (missing {e})") from None
    if mlp != 4 * hidden:
        # diffusers' FluxTransformer2DModel has the fixed MLP ratio 4 of FLUX.1
        raise UserError(f"{path}: FLUX MLP width {mlp} is not 4 x {hidden}; not a FLUX.1 transformer")
    return cfg


def model_name(config: Mapping) -> str:
    """sd-scripts' names: "dev" has guidance embedding, "schnell" has none."""
    return "dev" if config["guidance_embeds"] else "schnell"


def infer_t5_config(s: Shapes, path: str = "checkpoint") -> dict:
    """transformers ``T5Config`` kwargs for a ``T5EncoderModel`` from HF-layout shapes (t5xxl_fp16.safetensors)."""
    try:
        vocab, d_model = s["shared.weight"] if "shared.weight" in s else s["encoder.embed_tokens.weight"]
        attn = "encoder.block.0.layer.0.SelfAttention."
        buckets, heads = s[attn + "relative_attention_bias.weight"]
        inner = s[attn + "q.weight"][0]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in s
        d_ff = s["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    except KeyError as e:
        raise UserError(f"{path}: not a T5 encoder in the transformers layout (missing {e})") from None
    layers = _count(s, r"encoder\.block\.(\d+)\.")
    return {
        "vocab_size": vocab, "d_model": d_model, "d_kv": inner // heads, "d_ff": d_ff, "num_layers": layers,
        "num_heads": heads, "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu" if gated else "relu", "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1,
        "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False, "pad_token_id": 0,
        "eos_token_id": 1, "decoder_start_token_id": 0,
    }
