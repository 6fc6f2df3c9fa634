"""The VAE's latent distribution of an image, kept after its first encoding (training without ``--cache_latents``).

Without ``--cache_latents`` every step encodes its images and draws a fresh latent sample, as sd-scripts does.
The encoder's output, the distribution's moments, is a function of the pixels alone: an image seen again (the
next epoch, a DreamBooth folder's ``num_repeats``, the same side of a flip) has the same moments, and only the
draw from them differs. So the moments are kept, keyed by the pixels' own bytes, and every step still draws its
sample from the step's generator: the latents are the ones encoding again would give. An augmentation that changes
the pixels (``random_crop``, ``color_aug``) gives new bytes and is encoded, never matched by mistake; the runner
also turns the memo off for such a dataset (:func:`set_pixels_repeat`), since hashing and keeping images that never
come back costs time and host memory for nothing.

Bit for bit: every image is encoded on its own (a batch of one) the first time it is seen, so its moments never
depend on the images that share its batch or on what the process saw before: a resumed run, or a process of a
multi-process run, draws exactly the latents of a straight run. With batches of one image the latents are also
identical to encoding every step with the memo off; with larger batches they can differ from encoding the whole
batch at once in the last bit (the convolution kernels block a batch of 2 differently from a batch of 1).

Kept on the host, up to ``SDT_LATENT_MEMO_MB`` MiB (default 1024; ``0`` turns it off): 2 KiB per 64 px image,
512 KiB per 1024 px image in fp32. A value that is not a number is refused before any model loads
(:func:`check_budget`, called by the preflight).
"""
from __future__ import annotations

import hashlib
import os
import weakref

import torch

from library.errors import UserError

BUDGET_ENV = "SDT_LATENT_MEMO_MB"
DEFAULT_BUDGET_MB = 1024


def check_budget() -> int:
    """The memo's host budget in bytes from ``SDT_LATENT_MEMO_MB``; a value that is not a number >= 0 is one
    ``UserError`` naming the variable (a typo must not quietly become the default)."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET_MB * 2**20
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not mb >= 0 or mb == float("inf"):
        raise UserError(f"{BUDGET_ENV}={raw!r}: expected the latent memo's host budget in MiB, a number >= 0 "
                        f"(0 turns the memo off; default {DEFAULT_BUDGET_MB})")
    return int(mb * 2**20)


def _pixel_key(image: torch.Tensor) -> bytes:
    data = image.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.view(torch.uint8).numpy().tobytes())  # raw bytes: also for bfloat16, which numpy lacks
    return h.digest()


class LatentMemo:
    """Moments of the latent distribution per image, up to a byte budget; later images are encoded each time."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.moments: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def parameters(self, vae, images: torch.Tensor, device) -> torch.Tensor:
        """``vae.encode(images).latent_dist.parameters`` (the moments, batch first) on ``device``, each image
        encoded on its own the first time it is seen. ``images`` is the loader's batch, on any device."""
        rows, fresh = [], {}
        for i, key in enumerate(_pixel_key(image) for image in images):
            row = self.moments.get(key)
            row = row.to(device) if row is not None else fresh.get(key)
            if row is None:
                # a batch of one: the moments never depend on the images that share the batch
                with torch.no_grad():
                    row = vae.encode(images[i:i + 1].to(device, vae.dtype)).latent_dist.parameters[0]
                fresh[key] = row
                self._keep(key, row)
                self.misses += 1
            else:
                self.hits += 1
            rows.append(row)
        return torch.stack(rows)

    def sample(self, vae, images: torch.Tensor, device, generator: torch.Generator) -> torch.Tensor:
        """``vae.encode(images).latent_dist.sample(generator)`` through the kept moments."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # start-up (diffusers)

        return DiagonalGaussianDistribution(self.parameters(vae, images, device)).sample(generator=generator)

    def _keep(self, key: bytes, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if self.used + size > self.budget:
            return
        self.moments[key] = row.detach().to("cpu", copy=True)
        self.used += size


# one memo per VAE object; None: the runner turned it off for this VAE (the dataset's pixels never repeat)
_MEMOS: "weakref.WeakKeyDictionary[torch.nn.Module, LatentMemo | None]" = weakref.WeakKeyDictionary()


def set_pixels_repeat(vae, repeat: bool) -> None:
    """Told by the runner once the dataset is known: ``repeat=False`` (``random_crop``, ``color_aug``, a custom
    dataset class) means an image's pixels are new every time, so this VAE's batches skip the memo."""
    if not repeat:
        _MEMOS[vae] = None
    elif vae in _MEMOS and _MEMOS[vae] is None:
        del _MEMOS[vae]


def memo_for(vae) -> LatentMemo | None:
    """The memo of this VAE (one per model object, so two VAEs never share moments); None when turned off by the
    budget or because the dataset's pixels never repeat."""
    budget = check_budget()
    if budget == 0:
        return None
    if vae not in _MEMOS:
        _MEMOS[vae] = LatentMemo(budget)
    return _MEMOS[vae]
