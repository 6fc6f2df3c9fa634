"""The VAE's latent distribution of an image, kept after its first encoding (training without ``--cache_latents``).

Without ``--cache_latents`` every step encodes its images and draws a fresh latent sample, as sd-scripts does.
The encoder's output, the distribution's moments, is a function of the pixels alone: an image seen again (the
next epoch, a DreamBooth folder's ``num_repeats``, the same side of a flip) has the same moments, and only the
draw from them differs. So the moments are kept, keyed by the pixels' own bytes, and every step still draws its
sample from the step's generator: the latents are the ones encoding again would give. An augmentation that changes
the pixels (``random_crop``, ``color_aug``) gives new bytes and is encoded, never matched by mistake.

Bit for bit: an image's moments are computed in the batch it first came in. Encoding it again inside another
batch can round differently in the last bit (the convolution kernels may block a batch of 2 differently from a
batch of 1), just as the same image already does between two uncached runs whose batches differ; with batches
of one image, or the same batches, the latents are identical to encoding every step.

Kept on the host, up to ``SDT_LATENT_MEMO_MB`` MiB (default 1024; ``0`` turns it off): 2 KiB per 64 px image,
512 KiB per 1024 px image in fp32.
"""
from __future__ import annotations

import hashlib
import os
import weakref

import torch

BUDGET_ENV = "SDT_LATENT_MEMO_MB"
DEFAULT_BUDGET_MB = 1024


def _budget_bytes() -> int:
    raw = os.environ.get(BUDGET_ENV, "")
    try:
        return max(0, int(float(raw) * 2**20)) if raw else DEFAULT_BUDGET_MB * 2**20
    except ValueError:
        return DEFAULT_BUDGET_MB * 2**20


def _pixel_key(image: torch.Tensor) -> bytes:
    data = image.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.dtype == torch.bfloat16 else data.numpy().tobytes())
    return h.digest()


class LatentMemo:
    """Moments of the latent distribution per image, up to a byte budget; later images are encoded each time."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.moments: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def parameters(self, vae, images: torch.Tensor, device) -> torch.Tensor:
        """``vae.encode(images).latent_dist.parameters`` (the moments, batch first) on ``device``, encoding only
        the images not seen before. ``images`` is the loader's batch, on any device."""
        keys = [_pixel_key(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.moments]
        fresh = {}
        if missing:
            new_images = images[missing] if len(missing) < len(keys) else images
            with torch.no_grad():
                params = vae.encode(new_images.to(device, vae.dtype)).latent_dist.parameters
            for row, i in zip(params, missing):
                fresh[i] = row
                self._keep(keys[i], row)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = [fresh[i] if i in fresh else self.moments[key].to(device) for i, key in enumerate(keys)]
        return torch.stack(rows)

    def _keep(self, key: bytes, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if key in self.moments or self.used + size > self.budget:
            return
        self.moments[key] = row.detach().to("cpu", copy=True)
        self.used += size


_MEMOS: "weakref.WeakKeyDictionary[torch.nn.Module, LatentMemo]" = weakref.WeakKeyDictionary()


def memo_for(vae) -> LatentMemo | None:
    """The memo of this VAE (one per model object, so two VAEs never share moments); None when turned off."""
    budget = _budget_bytes()
    if budget == 0:
        return None
    memo = _MEMOS.get(vae)
    if memo is None:
        memo = _MEMOS[vae] = LatentMemo(budget)
    return memo
