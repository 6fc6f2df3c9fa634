"""Images in and out of latent space: init images, inpaint masks, VAE encode/decode (spec generation §7).

Pure image/tensor helpers; the denoising loop that uses them is in `pipeline.py`.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.webp")


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Image pixels per latent pixel: 2 ** (VAE levels - 1), as diffusers computes it (8 for every real SD
    VAE; a VAE with fewer levels, e.g. a tiny one, downsamples less)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def list_images(path: str, option: str) -> list[str]:
    """`--image_path` / `--mask_path`: one file, or a folder's `*.png *.jpg *.jpeg *.webp`, sorted. spec §1.4."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{option} {path}: no such file or folder")
    files = sorted({f for pat in IMAGE_PATTERNS for f in glob.glob(os.path.join(path, pat))})
    if not files:
        raise UserError(f"{option} {path}: folder holds no .png/.jpg/.jpeg/.webp image")
    return files


def open_image(path: str, mode: str, option: str) -> Image.Image:
    """Open an image in `mode` ("RGB" or "L"), naming the option on failure."""
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, ValueError) as e:
        raise UserError(f"{option} {path}: not a readable image ({e})") from None


def round_down(value: int, multiple: int) -> int:
    return value - value % multiple


def fit_init_image(image: Image.Image, width: int | None, height: int | None) -> Image.Image:
    """img2img size rule: resize to W×H only when both are given, then floor to ×32 (warn). spec §2, §7."""
    if width is not None and height is not None and image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    w, h = (round_down(v, 32) for v in image.size)
    if (w, h) != image.size:
        logger.warning("init image %dx%d resized to %dx%d (multiples of 32)", *image.size, w, h)
        image = image.resize((w, h), Image.LANCZOS)
    return image


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2.0 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 RGB PIL images (rounded as diffusers' numpy_to_pil)."""
    arr = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


def mask_to_latent_keep(masks: Sequence[Image.Image], width: int, height: int, factor: int,
                        channels: int = 4) -> torch.Tensor:
    """Inpaint masks -> (B, C, H/f, W/f) "keep" weights m = 1 − mask/255 (white = repaint, black = keep). spec §7."""
    rows = []
    for m in masks:
        m = m.convert("L")
        if m.size != (width, height):
            m = m.resize((width, height), Image.LANCZOS)
        rows.append(np.asarray(m, dtype=np.float32) / 255.0)
    mask = torch.from_numpy(np.stack(rows))[:, None]
    mask = F.interpolate(mask, size=(height // factor, width // factor), mode="bilinear", align_corners=False)
    return 1.0 - mask.repeat(1, channels, 1, 1)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: Sequence[Image.Image], generators: list[torch.Generator],
                  device: torch.device) -> torch.Tensor:
    """VAE-encode init images: a latent *sample* (drawn from each image's own generator) × scaling factor."""
    x = images_to_tensor(images).to(device=device, dtype=vae.dtype)
    dist = vae.encode(x).latent_dist
    return dist.sample(generator=generators).float() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, vae_batch_size: int | None = None) -> torch.Tensor:
    """Latents -> (B, 3, H, W) images in [-1, 1], `vae_batch_size` latents per VAE call. spec §1.1.

    A VAE with a `shift_factor` (FLUX.1's AE) had it subtracted before scaling: it is added back."""
    step = vae_batch_size or latents.shape[0]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    parts = []
    for i in range(0, latents.shape[0], step):
        z = latents[i: i + step].to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        parts.append(vae.decode(z).sample.float())
    return torch.cat(parts)


def vae_batch_size(option: float | None, batch_size: int) -> int | None:
    """`--vae_batch_size`: `<1` is a fraction of the batch size (min 1). spec §1.1."""
    if option is None:
        return None
    if option < 1:
        return max(1, int(batch_size * option))
    return int(option)


def upscale_latents(latents: torch.Tensor, width: int, height: int, factor: int) -> torch.Tensor:
    """Hires fix `--highres_fix_latents_upscaling`: bilinear resize in latent space. spec §7."""
    return F.interpolate(latents, size=(height // factor, width // factor), mode="bilinear", align_corners=False)


def upscale_images(images: Sequence[Image.Image], width: int, height: int) -> list[Image.Image]:
    """Hires fix default: LANCZOS image resize of the 1st-stage images. spec §7."""
    return [im.resize((width, height), Image.LANCZOS) for im in images]
