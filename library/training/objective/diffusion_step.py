"""One diffusion training forward: batch -> latents -> noise -> U-Net -> weighted loss.

Shared by every method; the method only decides what trains and how text is conditioned.
Randomness comes from generators derived from (seed, global step, micro-step, process), so a resumed
run draws exactly what an uninterrupted run would (spec losses-and-noise §3 order).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from library.errors import UserError
from library.training.loop import nonfinite_guard
from library.training.objective.latent_memo import memo_for
from library.training.objective.losses import LossConfig, conditional_loss, loss_mask_from_batch, reduce_and_weight
from library.training.objective.noise import NoiseConfig, compute_target, make_noisy_latents
from library.training.objective.noise_schedule import TrainingSchedule, build_training_schedule
from library.training.settings.sections import ObjectiveSettings


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the run seed and step coordinates (stable across runs and platforms)."""
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class StepRandom:
    """Per-micro-step random sources: a torch generator on the device and a Python RNG."""

    generator: torch.Generator
    rng: random.Random
    # validation: latents -> NoisyLatents with fixed noise and timesteps instead of random draws
    fixed: Optional[Callable[[torch.Tensor], Any]] = None

    @classmethod
    def for_step(cls, seed: int, global_step: int, micro_step: int, process: int, device) -> "StepRandom":
        """Also reseeds torch's global RNG: dropout inside networks (ours or plug-ins) draws from it, and
        data loaders consume it, so a per-step seed keeps a resumed run identical to a straight one."""
        s = step_seed(seed, global_step, micro_step, process)
        torch.manual_seed(step_seed(seed, global_step, micro_step, process, 1))
        g = torch.Generator(device=device)
        g.manual_seed(s)
        return cls(g, random.Random(s))


@dataclass
class DiffusionObjective:
    """The fixed pieces of the objective: schedule, noise and loss options, latent scaling."""

    sched: TrainingSchedule
    noise_cfg: NoiseConfig
    loss_cfg: LossConfig
    latent_scale: float

    @classmethod
    def from_settings(cls, objective: ObjectiveSettings, latent_scale: float) -> "DiffusionObjective":
        sched = build_training_schedule(objective.zero_terminal_snr, objective.v_parameterization)
        return cls(sched, objective.noise, objective.loss, latent_scale)


def batch_latents(batch: Mapping[str, Any], vae, scale: float, device, dtype, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents: cached ones (stored unscaled) or a VAE sample of the images, spec losses §2 (the
    distribution of an image seen before comes from :mod:`latent_memo`; the sample is drawn each step)."""
    if batch.get("latents") is not None:
        latents = batch["latents"].to(device)
    else:
        memo = memo_for(vae)
        with torch.no_grad():
            if memo is not None:
                latents = memo.sample(vae, batch["images"], device, generator)
            else:
                images = batch["images"].to(device, vae.dtype)
                latents = vae.encode(images).latent_dist.sample(generator=generator)
    # checked by the loop's non-finite guard together with the loss: no device sync here
    nonfinite_guard.watch("VAE latents", latents)
    return (latents * scale).to(dtype)


def diffusion_loss(unet_fn: Callable, latents: torch.Tensor, cond, batch: Mapping[str, Any],
                   obj: DiffusionObjective, rand: StepRandom) -> torch.Tensor:
    """Noise, predict, weighted loss (spec losses §3-§8). ``unet_fn(noisy, t, cond) -> prediction``.

    ``rand.fixed`` (validation) replaces the random noise and timesteps by given ones.
    """
    nonfinite_guard.watch("text-encoder output", cond.context)
    if cond.added_cond_kwargs is not None:
        nonfinite_guard.watch("text-encoder output", cond.added_cond_kwargs.get("text_embeds"))
    noisy = rand.fixed(latents) if rand.fixed is not None else \
        make_noisy_latents(latents, obj.noise_cfg, obj.sched, rand.generator, rand.rng)
    pred = unet_fn(noisy.noisy_latents, noisy.timesteps, cond)
    nonfinite_guard.watch("U-Net output", pred)
    target = compute_target(latents, noisy.noise, noisy.timesteps, obj.sched, obj.noise_cfg.v_parameterization)
    elem = conditional_loss(pred.float(), target.float(), obj.loss_cfg.loss_type, noisy.huber_c)
    mask = loss_mask_from_batch(batch, tuple(latents.shape[-2:])) if obj.loss_cfg.masked_loss else None
    if obj.loss_cfg.masked_loss and mask is None:
        raise UserError("--masked_loss needs mask images: a ControlNet-style subset (conditioning_data_dir) "
                        "or alpha_mask = true")
    weights = batch.get("loss_weights")
    return reduce_and_weight(elem, noisy.timesteps, weights, obj.sched, obj.loss_cfg, mask)


def unet_batch_loss(unet, vae, cond, batch: Mapping[str, Any], obj: DiffusionObjective, rand: StepRandom,
                    accelerator, dtype: torch.dtype) -> torch.Tensor:
    """The batch's latents, then :func:`diffusion_loss` through ``unet`` under the accelerator's autocast (the
    whole-model trainers' loss once their text conditioning is known)."""
    latents = batch_latents(batch, vae, obj.latent_scale, accelerator.device, dtype, rand.generator)
    with accelerator.autocast():
        return diffusion_loss(lambda x, t, c: call_unet(unet, x, t, c), latents, cond, batch, obj, rand)


def call_unet(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
    """Diffusers U-Net forward with our conditioning object.

    Inputs take the U-Net's own dtype: a trained U-Net stays fp32 under mixed precision and relies on
    autocast, which the CPU does not provide for fp16; a frozen one was cast to the training dtype.
    """
    dtype = getattr(unet, "module", unet).dtype  # a trained U-Net may come wrapped by DDP, which has no dtype
    if dtype.itemsize == 1:  # --fp8_base: fp8 storage, computed in the training dtype (fp8_storage.py)
        dtype = cond.context.dtype
    added = cond.added_cond_kwargs
    if added is not None:
        added = {k: v.to(dtype) for k, v in added.items()}
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    return unet(noisy.to(dtype), timesteps, cond.context.to(dtype), **kwargs).sample
