"""Tiny FLUX.1 models (dev with guidance embedding, schnell without): the real module names and key layout.

Widths obey the loaders' rules (64-wide CLIP heads, 32-multiple FLUX heads for the rotary axes, MLP 4x,
16 latent channels packed 2x2 -> 64 transformer inputs), so their files load through the normal path.
The T5 tokenizer is a small Unigram vocabulary built here (no SentencePiece file, no hub).
"""
from __future__ import annotations

import torch

from .flux_bundle import FluxModels
from .tiny import _text_config

T5_WIDTH, CLIP_WIDTH = 32, 32
_WORDS = ("a an the of in on with and photo picture image drawing red green blue yellow black white circle square "
          "triangle star shape cat dog person man woman girl boy sky tree house car background small large one two "
          "three").split()


def tiny_flux_config(name: str, blocks: tuple[int, int] = (2, 2)) -> dict:
    """``blocks``: (double, single) block counts (block-swap tests need more than two of each)."""
    if name not in ("dev", "schnell"):
        raise ValueError(f"unknown FLUX model {name!r}; expected dev or schnell")
    return dict(patch_size=1, in_channels=64, num_layers=blocks[0], num_single_layers=blocks[1],
                attention_head_dim=32, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                pooled_projection_dim=CLIP_WIDTH, guidance_embeds=name == "dev", axes_dims_rope=(4, 14, 14))


def tiny_ae_config() -> dict:
    return dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, force_upcast=True)


def tiny_t5_config():
    from transformers import T5Config  # start-up (transformers: ~1 s)

    return T5Config(vocab_size=256, d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False,
                    use_cache=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def tiny_t5_tokenizer():
    """Words as "▁word" pieces (more likely first), then single characters so any text tokenizes."""
    from .t5_tokenizer import build_unigram_t5_tokenizer  # start-up (imports transformers: ~1 s)

    pieces = [("▁" + w, -2.0 - 0.01 * i) for i, w in enumerate(_WORDS)] + [("▁", -6.0)]
    pieces += [(c, -9.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?()'-"]
    return build_unigram_t5_tokenizer(pieces)


def build_tiny_flux(name: str = "dev", seed: int = 0, blocks: tuple[int, int] = (2, 2)) -> FluxModels:
    """Random-weight tiny FLUX.1 ``name`` with both tokenizers (no files written)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel  # start-up (diffusers: ~2 s)
    from transformers import CLIPTextModel, T5EncoderModel  # start-up (transformers: ~1 s)

    from .tokenizers import load_tokenizers  # start-up (imports transformers: ~1 s)

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_flux_config(name, blocks))
    ae = AutoencoderKL(**tiny_ae_config())
    clip_l = CLIPTextModel(_text_config(CLIP_WIDTH, 3, "quick_gelu"))
    t5 = T5EncoderModel(tiny_t5_config())
    t5.encoder.embed_tokens.weight = t5.shared.weight  # one tensor, as a T5 file stores it
    # random init leaves norms at one and biases at zero: perturb so conversions are really tested
    for m in (transformer, ae, clip_l, t5):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        m.eval()
    return FluxModels(transformer, ae, clip_l, t5, [load_tokenizers("sd1")[0], tiny_t5_tokenizer()])
