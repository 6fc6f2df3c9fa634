"""The real SD 1.5 and SDXL architectures with random weights, built on any device without a download.

For benchmarks that must run at the real size (bench/gpu_bench.py): the configs are those of the released
models (U-Net, VAE, CLIP ViT-L/14, OpenCLIP ViT-bigG/14), so FLOPs, memory and kernel shapes are real;
only the weights are random (seeded).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .bundle import SDModels

SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)


def unet_config(family: str) -> dict:
    return {"sd1": SD15_UNET, "sdxl": SDXL_UNET}[family]


def _text_encoder(cfg: dict, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # start-up (transformers: ~1 s)

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=1, **cfg)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_random_models(family: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        seed: int = 0) -> SDModels:
    """Real-size ``sd1`` (SD 1.5) or ``sdxl`` models with seeded random weights, built directly on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # start-up (diffusers: ~2 s)

    from .tokenizers import load_tokenizers  # start-up (imports transformers: ~1 s)

    if family not in ("sd1", "sdxl"):
        raise ValueError(f"real-size random models exist for sd1 and sdxl, not {family!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(family))
        vae = AutoencoderKL(**VAE, scaling_factor=0.13025 if family == "sdxl" else 0.18215)
        tes = [_text_encoder(CLIP_L, False)]
        if family == "sdxl":
            tes.append(_text_encoder(CLIP_BIG_G, True))
    for m in (unet, vae, *tes):
        m.to(dtype).eval()
    return SDModels(family, unet, vae, tes, load_tokenizers(family))


def unet_forward_flops(family: str, batch: int, latent_hw: tuple[int, int]) -> int:
    """FLOPs of one U-Net forward at this batch and latent size, counted by torch's FLOP counter on the real
    config built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel  # start-up (diffusers: ~2 s)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(family))
        x = torch.empty(batch, 4, *latent_hw)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, 77, unet.config.cross_attention_dim)
        added = None
        if family == "sdxl":
            added = {"text_embeds": torch.empty(batch, 1280), "time_ids": torch.empty(batch, 6)}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, ctx, added_cond_kwargs=added)
    return int(counter.get_total_flops())
