"""Validation loss on held-out images (``validation_split``), the same for every trainer (docs §1).

Determinism: every validation batch is evaluated at ``BANDS`` timesteps, the centres of equal bands of
``[min_timestep, max_timestep)`` (100, 300, 500, 700, 900 by default). Item ``j`` of validation batch
``k`` at band ``b`` gets its noise from its own CPU generator seeded by ``(validation_seed, k, j, b)``;
VAE sampling uses a generator seeded by ``(validation_seed, k)``. So a validation pass gives the same
number each time for the same weights, and it draws nothing from the training RNGs: the training
losses are the same with or without validation. Dropout is off (eval mode) during validation.

Logs: ``loss/validation`` (mean over items and bands) and ``loss/validation_t<lo>-<hi>`` per band.
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import Iterator, Optional

import torch

from library.training.objective.diffusion_step import StepRandom, step_seed
from library.training.objective.noise import NoisyLatents, huber_c_for_timestep, timestep_bounds
from library.training.settings import ValidationSettings

logger = logging.getLogger(__name__)

BANDS = 5
_SEED_TAG = 0x5A1D  # keeps validation seeds apart from the training steps' seeds of the same run seed


def band_timesteps(lo: int, hi: int, bands: int = BANDS) -> list[tuple[int, int, int]]:
    """``[(t, band_lo, band_hi_inclusive)]``: the centre timestep of each of ``bands`` equal bands."""
    out = []
    for b in range(bands):
        start, end = lo + (hi - lo) * b // bands, lo + (hi - lo) * (b + 1) // bands
        out.append(((start + end) // 2, start, end - 1))
    return out


class Validator:
    """Runs the validation pass when it is due and returns the logs."""

    def __init__(self, group, accelerator, settings: ValidationSettings):
        self.group, self.acc, self.seed = group, accelerator, settings.seed
        self.every_steps = settings.every_n_steps
        self.every_epochs = settings.every_n_epochs
        if not self.every_steps and not self.every_epochs:
            self.every_epochs = 1  # later sd-scripts validates after every epoch by default
        limit = settings.max_steps
        self.num_batches = min(len(group), limit) if limit else len(group)
        self.last: Optional[float] = None
        group.set_current_epoch(1)  # the validation batches never change: always epoch 1's order

    def due_after_step(self, global_step: int) -> bool:
        return bool(self.every_steps) and global_step % self.every_steps == 0

    def due_after_epoch(self, epochs_done: int) -> bool:
        return bool(self.every_epochs) and epochs_done % self.every_epochs == 0

    def run(self, method) -> dict:
        """Mean loss over the validation items at every band; this process takes every N-th batch.

        Each batch's mean counts with its number of items, and the ranks' sums and item counts are added
        before dividing: the result is the mean over the whole validation set, whatever the batch sizes
        and however many processes share the batches."""
        obj = method.obj
        lo, hi = timestep_bounds(obj.noise_cfg.min_timestep, obj.noise_cfg.max_timestep, obj.sched.num_train_timesteps)
        bands = band_timesteps(lo, hi)
        sums = torch.zeros(len(bands) + 1, dtype=torch.float64)
        mine = range(self.acc.process_index, self.num_batches, self.acc.num_processes)
        with torch.no_grad(), _eval_mode(getattr(method, "modules", (method.module,))):
            for k in mine:
                batch = {key: (v.to(self.acc.device) if isinstance(v, torch.Tensor) else v)
                         for key, v in self.group[k].items()}
                items = len(batch["loss_weights"])
                for b, (t, _, _) in enumerate(bands):
                    loss = method.loss(batch, self._random(k, b, t, obj))
                    sums[b] += float(loss) * items
                sums[-1] += items
        sums = self.acc.reduce(sums.to(self.acc.device), reduction="sum").cpu()
        count = max(float(sums[-1]), 1.0)
        per_band = [float(s) / count for s in sums[:-1]]
        self.last = sum(per_band) / len(per_band)
        logs = {"loss/validation": self.last}
        logs.update({f"loss/validation_t{b_lo}-{b_hi}": v for (_, b_lo, b_hi), v in zip(bands, per_band)})
        return logs

    def _random(self, k: int, band: int, t: int, obj) -> StepRandom:
        """Fixed latents sampling (per batch) and fixed noise (per item and band) at timestep ``t``."""
        gen = torch.Generator(device=self.acc.device)
        gen.manual_seed(step_seed(self.seed, _SEED_TAG, k))
        huber_c = None if obj.noise_cfg.loss_type == "l2" else huber_c_for_timestep(
            t, obj.noise_cfg.huber_schedule, obj.noise_cfg.huber_c, obj.sched.alphas_cumprod,
            obj.sched.num_train_timesteps)

        def fixed(latents: torch.Tensor) -> NoisyLatents:
            noise = torch.stack([torch.randn(tuple(latents.shape[1:]), generator=torch.Generator().manual_seed(
                step_seed(self.seed, _SEED_TAG, k, j, band))) for j in range(latents.shape[0])])
            noise = noise.to(latents.device, latents.dtype)
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
            return NoisyLatents(noise, obj.sched.scheduler.add_noise(latents, noise, timesteps), timesteps, huber_c)

        return StepRandom(gen, random.Random(step_seed(self.seed, _SEED_TAG, k, band)), fixed)


@contextlib.contextmanager
def _eval_mode(modules) -> Iterator[None]:
    """Dropout off for the pass; every submodule's training flag restored afterwards."""
    flags = [(m, m.training) for module in modules if module is not None for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, training in flags:
            m.training = training
