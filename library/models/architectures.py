"""Model families (SD1 / SD2 / SDXL): LDM prefixes, detection from keys, configs inferred from shapes.

Single files carry no config, so every size is read from tensor shapes. Head counts are not in the
weights: SD1 uses 8 heads everywhere, SD2/SDXL (and every CLIP text encoder) use 64-wide heads; the
tiny test models follow the same rules (``max(1, width // 64)``), so one rule loads real and tiny files.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from library.errors import UserError

FAMILIES = ("sd1", "sd2", "sdxl")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# text encoders per family: (LDM prefix, layout)
TEXT_ENCODERS = {
    "sd1": [("cond_stage_model.transformer.", "hf")],
    "sd2": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "open_clip")],
}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "flux": 0.3611}
VAE_SHIFT = {"flux": 0.1159}  # FLUX's AE: latents = (z - shift) * scale
SAMPLE_SIZE = {"sd1": 64, "sd2": 64, "sdxl": 128, "flux": 128}  # latent size of the default resolution
SIZE_EMB_DIM = 256  # SDXL size conditioning: 6 sinusoidal embeddings of 256 each (spec losses §9)
# GroupNorm group counts are not in the weights; real SD files all use 32. Files we write for models
# with another count (small demo models) record it in these safetensors metadata keys.
NORM_GROUPS_KEYS = {"unet": "sdt.unet.norm_num_groups", "vae": "sdt.vae.norm_num_groups"}

Shapes = Mapping[str, tuple]


def detect_family(keys: Iterable[str], path: str = "checkpoint") -> str:
    """Family from the LDM key layout; an unknown layout is a clear error naming the file."""
    keys = set(keys)
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in keys:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) and has_unet:
        return "sd1"
    if has_unet:
        raise UserError(f"{path}: U-Net keys found but no text encoder of a known layout (SD1/SD2/SDXL)")
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise UserError(f"{path}: unknown key layout, not a Stable Diffusion checkpoint (first keys: {sample})")


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def unet_heads(family: str, channels: int) -> int:
    return 8 if family == "sd1" else max(1, channels // 64)


def norm_groups(metadata: Mapping[str, str] | None, part: str) -> int:
    """GroupNorm groups of ``part`` recorded by our writer, else the real models' 32."""
    value = (metadata or {}).get(NORM_GROUPS_KEYS[part])
    return int(value) if value else 32


def infer_unet_config(s: Shapes, family: str, v_parameterization: bool = False) -> dict:
    """Diffusers ``UNet2DConditionModel`` config from LDM U-Net shapes (keys without prefix)."""
    n_in = _count(s, r"input_blocks\.(\d+)\.")
    n_levels = _count(s, r"input_blocks\.(\d+)\.0\.op\.") + 1
    lpb = (n_in - n_levels) // n_levels
    channels, has_attn, depth = [], [], []
    for i in range(n_levels):
        first = (lpb + 1) * i + 1
        channels.append(s[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        attn = f"input_blocks.{first}.1.proj_in.weight" in s
        has_attn.append(attn)
        depth.append(_count(s, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.") if attn else 1)
    attn_key = next(k for k in s if k.endswith("attn2.to_k.weight"))
    proj = next(k for k in s if k.endswith("proj_in.weight"))
    cfg = {
        "sample_size": SAMPLE_SIZE[family] if not (family == "sd2" and v_parameterization) else 96,
        "in_channels": s["input_blocks.0.0.weight"][1],
        "out_channels": s["out.2.weight"][0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": s[attn_key][1],
        "attention_head_dim": 8 if family == "sd1" else [unet_heads(family, c) for c in channels],
        "use_linear_projection": len(s[proj]) == 2,
        "transformer_layers_per_block": depth if family == "sdxl" else 1,
        "upcast_attention": family == "sd2" and v_parameterization,
        "norm_num_groups": 32,
    }
    if family == "sdxl":
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMB_DIM,
                   projection_class_embeddings_input_dim=s["label_emb.0.0.weight"][1])
    return cfg


def infer_vae_config(s: Shapes, family: str) -> dict:
    """Diffusers ``AutoencoderKL`` config from LDM VAE shapes (keys without prefix)."""
    n = _count(s, r"encoder\.down\.(\d+)\.")
    lpb = _count(s, r"encoder\.down\.0\.block\.(\d+)\.")
    return {
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [s[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(n)],
        "layers_per_block": lpb,
        "latent_channels": s["decoder.conv_in.weight"][1],
        "sample_size": SAMPLE_SIZE[family] * 8,
        "scaling_factor": VAE_SCALING[family],
        "shift_factor": VAE_SHIFT.get(family),
        # FLUX's AE has no quant convs; SD files all do
        "use_quant_conv": "quant_conv.weight" in s,
        "use_post_quant_conv": "post_quant_conv.weight" in s,
        "force_upcast": True,
        "norm_num_groups": 32,
    }


def infer_text_config(s: Shapes, layout: str, family: str) -> dict:
    """transformers ``CLIPTextConfig`` kwargs from LDM text-encoder shapes (keys without prefix)."""
    if layout == "hf":
        p = "text_model."
        vocab, width = s[f"{p}embeddings.token_embedding.weight"]
        layers = _count(s, rf"{re.escape(p)}encoder\.layers\.(\d+)\.")
        inter = s[f"{p}encoder.layers.0.mlp.fc1.weight"][0]
        max_pos = s[f"{p}embeddings.position_embedding.weight"][0]
        act, proj = "quick_gelu", width
    else:
        vocab, width = s["token_embedding.weight"]
        layers = _count(s, r"transformer\.resblocks\.(\d+)\.")
        if family == "sd2":
            layers -= 1  # SD2 conditions on the penultimate layer: the last block is never loaded (spec §f)
        inter = s["transformer.resblocks.0.mlp.c_fc.weight"][0]
        max_pos = s["positional_embedding"][0]
        act = "gelu"
        proj = s["text_projection"][1] if "text_projection" in s else width
    return {
        "vocab_size": vocab, "hidden_size": width, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 64), "max_position_embeddings": max_pos, "hidden_act": act,
        "projection_dim": proj, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
