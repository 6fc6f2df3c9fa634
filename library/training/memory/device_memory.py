"""Accelerator memory around caching and sampling: frozen models a run no longer needs leave the GPU.

Once every latent is cached the VAE is not used by a training step, and once every SDXL text-encoder output
is cached (U-Net-only network training) neither are the text encoders: they wait in CPU memory and come back
to the device only while sample images are drawn. That is what sd-scripts does too (the VAE and cached text
encoders move to the CPU, then its ``clean_memory_on_device``); for SDXL it is 1.6 GB of text encoders and
the VAE's 160 MB, plus the caching's activations that the allocator would otherwise keep reserved.
"""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

PARK = torch.device("cpu")


def free_cached_memory(device: torch.device | str | None = None) -> None:
    """Return the allocator's unused cached blocks to the device (a no-op where nothing was allocated)."""
    gc.collect()
    kind = torch.device(device).type if device is not None else "cuda"
    if kind == "cuda":
        torch.cuda.empty_cache()  # does nothing while CUDA is not initialized
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


class Parking:
    """Frozen modules kept in CPU memory between uses; ``on_device()`` brings them back for a while."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.modules: list[torch.nn.Module] = []

    def park(self, *modules: torch.nn.Module) -> None:
        for m in modules:
            m.to(PARK)
            self.modules.append(m)
        free_cached_memory(self.device)

    @contextmanager
    def on_device(self) -> Iterator[None]:
        for m in self.modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in self.modules:
                m.to(PARK)
            free_cached_memory(self.device)


def park_unused_models(models, acc, sample: Optional[Callable], latents_cached: bool = False,
                       text_encoders_cached: bool = False) -> Optional[Callable]:
    """After all caching (training and validation images): park the VAE when latents are cached and the text
    encoders when their outputs are; returns the sample hook wrapped so sampling finds them on the device."""
    parking = Parking(acc.device)
    names = []
    if latents_cached:
        parking.park(models.vae)
        names.append("VAE")
    if text_encoders_cached:
        parking.park(*models.text_encoders)
        names.append("text encoders")
    free_cached_memory(acc.device)
    if names:
        logger.info("%s kept in CPU memory while training (outputs cached)", " and ".join(names))
    if sample is None:
        return None

    def sample_on_device(epoch: Optional[int], steps: int) -> None:
        with parking.on_device():  # frees the sampling's cached blocks afterwards, parked or not
            sample(epoch, steps)

    return sample_on_device
