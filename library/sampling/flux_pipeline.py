"""FLUX.1 txt2img for gen_img: per-image noise -> prompt encoding -> flow-matching Euler -> AE decode.

The same reproducible-noise rule as the SD pipeline (pipeline.py): every image has its own CPU generator
seeded with its seed and draws its (16, H/8, W/8) start noise first, so an image depends only on its seed.
The noise is packed into 2x2 patches afterwards, as diffusers' ``FluxPipeline`` draws it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from library.errors import UserError
from library.models.flux_bundle import FluxModels
from library.sampling.flux_sampling import FluxConditioning, euler_sample, flux_sigmas, pack_latents, unpack_latents
from library.sampling.flux_text import encode_flux_prompts
from library.sampling.img2img import decode_latents, tensor_to_images, vae_scale_factor
from library.sampling.pipeline import GenSettings, ImageSpec, draw_noise, make_generators

DEFAULT_GUIDANCE = 3.5  # sd-scripts' --guidance_scale / flux_minimal_inference --guidance default


class FluxGenerator:
    """Generates FLUX.1 dev / schnell images on loaded models (gen_img's ``Pipeline`` for FLUX)."""

    def __init__(self, models: FluxModels, device: torch.device | str = "cpu", *, t5_max_length: int = 512,
                 apply_t5_attn_mask: bool = False, vae_batch_size: int | None = None, progress: bool = True):
        self.models = models
        self.device = torch.device(device)
        self.t5_max_length = t5_max_length
        self.apply_t5_attn_mask = apply_t5_attn_mask
        self.vae_batch_size = vae_batch_size
        self.progress = progress

    def encode(self, prompts: Sequence[str]) -> FluxConditioning:
        m = self.models
        return encode_flux_prompts(m.clip_l, m.t5xxl, m.tokenizers, prompts, self.t5_max_length,
                                   self.apply_t5_attn_mask)

    def guidance(self, settings: GenSettings) -> float | None:
        """dev: the batch's guidance value (3.5 when none was given); schnell has no guidance input."""
        if self.models.is_schnell:
            return None
        return DEFAULT_GUIDANCE if settings.guidance_scale is None else settings.guidance_scale

    def latent_size(self, settings: GenSettings) -> tuple[int, int]:
        """(rows, columns) of the unpacked latents; the image must cover whole 2x2 latent patches."""
        f = vae_scale_factor(self.models.ae)
        if settings.width % (2 * f) or settings.height % (2 * f):
            raise UserError(f"image size {settings.width}x{settings.height}: FLUX.1 needs multiples of {2 * f} "
                            "(--W/--H or --w/--h)")
        return settings.height // f, settings.width // f

    @torch.no_grad()
    def generate_latents(self, specs: Sequence[ImageSpec], settings: GenSettings,
                         noise: torch.Tensor | None = None) -> torch.Tensor:
        """txt2img for one batch; returns the final unpacked latents (B, 16, H/8, W/8), before the AE.

        ``noise``: the unpacked start noise, instead of the one drawn from each image's seed (tests)."""
        h, w = self.latent_size(settings)
        if noise is None:
            noise = draw_noise(make_generators([s.seed for s in specs]), (self.models.ae.config.latent_channels, h, w),
                               self.device)
        cond = self.encode([s.prompt for s in specs])
        sigmas = flux_sigmas(settings.steps, (h // 2) * (w // 2), shift=not self.models.is_schnell)
        packed = euler_sample(self.models.transformer, pack_latents(noise.to(self.device)), cond, sigmas,
                              self.guidance(settings), h // 2, w // 2, progress=self.progress)
        return unpack_latents(packed, h, w)

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, H, W) in [-1, 1] (the AE's scaling and shift undone)."""
        return decode_latents(self.models.ae, latents, self.vae_batch_size)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return tensor_to_images(self.decode_tensor(latents))

    def generate(self, specs: Sequence[ImageSpec], settings: GenSettings) -> list[Image.Image]:
        """One batch to images."""
        return self.decode(self.generate_latents(specs, settings))
