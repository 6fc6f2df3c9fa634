"""FLUX.1 flow-matching sampling: the shifted schedule, 2x2 latent packing, position ids and the Euler loop.

Formulas as sd-scripts' ``flux_train_utils.get_schedule`` / ``denoise`` and BFL's reference code: sigmas run
from 1 to 0 in ``steps`` equal steps; dev shifts them towards 1 with ``mu`` interpolated linearly in the image
token count (0.5 at 256 tokens, 1.15 at 4096), schnell is not shifted. One Euler step is
``x += (sigma_next - sigma) * v`` with the transformer's velocity ``v``. The transformer is diffusers'
``FluxTransformer2DModel``: it takes sigma itself as the timestep (and multiplies by 1000 inside, as BFL's
model does), and the dev guidance value likewise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096  # image tokens at which mu is BASE_SHIFT / MAX_SHIFT
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
PATCH = 2  # latents are packed into 2x2 patches: 16 channels -> 64 transformer inputs


@dataclass
class FluxConditioning:
    """Text conditioning of one batch: CLIP-L pooled vectors, T5 tokens and (with --apply_t5_attn_mask) the
    T5 attention mask."""

    pooled: torch.Tensor  # (B, CLIP width)
    t5: torch.Tensor  # (B, L, T5 width)
    t5_mask: torch.Tensor | None = None  # (B, L), 1 = real token; None = every token is attended to


def shift_mu(image_seq_len: int) -> float:
    """``mu`` of the time shift: the line through (256, 0.5) and (4096, 1.15) at ``image_seq_len``."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (image_seq_len - BASE_SEQ_LEN)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """``e^mu / (e^mu + (1/t - 1))`` (sigma exponent 1): t = 1 stays 1, t = 0 stays 0."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def flux_sigmas(steps: int, image_seq_len: int, shift: bool) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 to 0 (the last is the clean image), shifted for dev."""
    sigmas = torch.linspace(1, 0, steps + 1)
    return time_shift(shift_mu(image_seq_len), sigmas) if shift else sigmas


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 patch becomes one token, channels outermost."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for latents of ``height`` x ``width`` (latent pixels)."""
    b, _, d = packed.shape
    x = packed.view(b, height // PATCH, width // PATCH, d // (PATCH * PATCH), PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // (PATCH * PATCH), height, width)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 3) rotary position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def joint_attention_mask(t5_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """(B, 1, 1, L + S) boolean key mask over [text, image] tokens: padding T5 tokens are not attended to.

    sd-scripts' ``--apply_t5_attn_mask`` masks the same keys in the double and the single blocks.
    """
    image = torch.ones(t5_mask.shape[0], image_tokens, dtype=torch.bool, device=t5_mask.device)
    return torch.cat([t5_mask.bool(), image], dim=1)[:, None, None, :]


def euler_sample(transformer: torch.nn.Module, latents: torch.Tensor, cond: FluxConditioning,
                 sigmas: torch.Tensor, guidance: float | None, rows: int, cols: int,
                 progress: bool = True) -> torch.Tensor:
    """Flow-matching Euler steps over ``sigmas`` from packed ``latents`` (B, rows * cols, 64); returns the
    packed clean latents in float32. ``guidance``: dev's distilled guidance value (None for schnell)."""
    dtype = next(transformer.parameters()).dtype
    device = latents.device
    b = latents.shape[0]
    x = latents.float()
    img_ids = image_ids(rows, cols).to(device, dtype)
    txt_ids = torch.zeros(cond.t5.shape[1], 3, device=device, dtype=dtype)
    guidance_vec = None if guidance is None else torch.full((b,), guidance, device=device, dtype=torch.float32)
    kwargs = None if cond.t5_mask is None else {"attention_mask": joint_attention_mask(cond.t5_mask.to(device),
                                                                                        rows * cols)}
    pooled, t5 = cond.pooled.to(device, dtype), cond.t5.to(device, dtype)
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", leave=False, disable=not progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((b,), sigma, device=device, dtype=dtype)
        v = transformer(hidden_states=x.to(dtype), timestep=t, guidance=guidance_vec, pooled_projections=pooled,
                        encoder_hidden_states=t5, txt_ids=txt_ids, img_ids=img_ids,
                        joint_attention_kwargs=kwargs, return_dict=False)[0]
        x = x + (sigma_next - sigma) * v.float()
    return x
