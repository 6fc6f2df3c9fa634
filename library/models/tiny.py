"""Tiny SD1 / SD2 / SDXL models: the real module names and key layout, a few channels.

Deterministic for a seed. Used by every test and by the demo; sizes obey the same head-count rules as
the real models (architectures.py), so their single files load through the normal inference path.
"""
from __future__ import annotations

import torch

from .bundle import SDModels

VOCAB = 49408  # the real CLIP vocabulary, so the real tokenizer works


def _text_config(width: int, layers: int, act: str, proj: int | None = None):
    from transformers import CLIPTextConfig  # start-up (transformers: ~1 s)

    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
                          num_attention_heads=max(1, width // 64), max_position_embeddings=77, hidden_act=act,
                          projection_dim=proj or width, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)


def tiny_unet_config(family: str) -> dict:
    if family == "sdxl":
        # two encoders of different widths (pitfall 13): 32 + 64 = context 96, pooled 64
        return dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 1, 2), cross_attention_dim=96, attention_head_dim=(1, 1, 1),
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=64 + 6 * 256)
    common = dict(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if family == "sd1":
        return dict(common, cross_attention_dim=32, attention_head_dim=8)
    return dict(common, cross_attention_dim=64, attention_head_dim=(1, 1, 1, 1), use_linear_projection=True)


def tiny_vae_config(family: str) -> dict:
    # four levels keep the real 8x downsampling, so latent sizes match real models
    return dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=64, scaling_factor=0.13025 if family == "sdxl" else 0.18215, force_upcast=True)


def build_tiny_models(family: str, seed: int = 0, v_parameterization: bool = False) -> SDModels:
    """Random-weight tiny models of ``family`` with tokenizers (no files written)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # start-up (diffusers: ~2 s)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # start-up (transformers: ~1 s)

    from .tokenizers import load_tokenizers  # start-up (imports transformers: ~1 s)

    if family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(family))
    vae = AutoencoderKL(**tiny_vae_config(family))
    if family == "sd1":
        tes = [CLIPTextModel(_text_config(32, 3, "quick_gelu"))]
    elif family == "sd2":
        tes = [CLIPTextModel(_text_config(64, 3, "gelu"))]
    else:
        tes = [CLIPTextModel(_text_config(32, 3, "quick_gelu")),
               CLIPTextModelWithProjection(_text_config(64, 3, "gelu", proj=64))]
    # random init leaves some tensors exactly zero/one (norms, biases): perturb so conversions are really tested
    for m in (unet, vae, *tes):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        m.eval()
    return SDModels(family, unet, vae, tes, load_tokenizers(family), v_parameterization=v_parameterization)
