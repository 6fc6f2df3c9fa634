"""Noise construction, timestep sampling and regression target for training, spec losses §3, §4, §7.

Every random draw takes an explicit ``torch.Generator`` (and pyramid noise an explicit ``random.Random``),
so a training step is reproducible from its seeds. Upstream sd-scripts draws from the global torch RNG
(noise on the training device, huber timesteps on the CPU) and the global Python ``random``; passing
``generator=None`` / ``rng=None`` falls back to those global RNGs. The ORDER of the draws follows upstream.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from library.errors import UserError
from library.training.objective.noise_schedule import TrainingSchedule

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

Strength = Union[float, torch.Tensor]


def check_loss_choices(loss_type: str, huber_schedule: str) -> None:
    """--loss_type / --huber_schedule must be one of the spec's choices (cli-options §4.4)."""
    if loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if huber_schedule not in HUBER_SCHEDULES:
        raise UserError(f"--huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {huber_schedule!r}")


@dataclass(frozen=True)
class NoiseConfig:
    """The options that shape noise and timesteps (spec cli-options §4.4), read once from the options."""

    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    v_parameterization: bool = False

    def __post_init__(self) -> None:
        check_loss_choices(self.loss_type, self.huber_schedule)


class NoisyLatents(NamedTuple):
    """Result of :func:`make_noisy_latents`; unpacks like upstream's 4-tuple."""

    noise: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    huber_c: Optional[float]


def _randn(
    shape: tuple, device: torch.device, dtype: torch.dtype, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """N(0,1) drawn on the generator's device (global RNG on ``device`` without one), moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _rand1(generator: Optional[torch.Generator]) -> torch.Tensor:
    """One U(0,1) draw, shape (1,), on the CPU or the generator's device."""
    if generator is None:
        return torch.rand(1)
    return torch.rand(1, generator=generator, device=generator.device).cpu()


def random_strength(value: float, randomize: bool, generator: Optional[torch.Generator]) -> Strength:
    """``value`` or ``U(0,1)·value`` drawn once per step for the whole batch (spec §3.1, §3.3, pitfall 6)."""
    if randomize:
        return _rand1(generator) * value
    return value


def apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    offset: Strength,
    adaptive_noise_scale: Optional[float],
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """ε + o_bc · z_bc with z ~ N(0,1) of shape (B, C, 1, 1), adaptive o clamped at 0, spec losses §3.1."""
    if isinstance(offset, torch.Tensor):
        offset = offset.to(latents.device)
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        # clamp because the adaptive scale may be negative
        offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
    z = _randn((latents.shape[0], latents.shape[1], 1, 1), latents.device, latents.dtype, generator)
    return noise + offset * z


def pyramid_noise_like(
    noise: torch.Tensor,
    iterations: int,
    discount: float = 0.3,
    generator: Optional[torch.Generator] = None,
    rng: Optional[random.Random] = None,
) -> torch.Tensor:
    """Multi-resolution noise with upstream's exact loop, early break and one unbiased std, spec losses §3.2."""
    rng = rng if rng is not None else random  # upstream: the global Python RNG (pitfall 5)
    b, c, h, w = noise.shape  # upstream names these (w, h) but the order is (H, W)
    # upstream adds in place into the caller's tensor; we work on a copy (same arithmetic, no side effect)
    noise = noise.clone()
    for i in range(iterations):
        r = rng.random() * 2 + 2  # a new scale factor every level, rather than always 2x
        hi, wi = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        # drawn in float32 on the CPU (or the generator's device) and then moved, as upstream
        level = _randn((b, c, hi, wi), torch.device("cpu"), torch.float32, generator).to(noise.device)
        noise += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hi == 1 or wi == 1:
            break  # the lowest resolution has been reached
    return noise / noise.std()


def timestep_bounds(
    min_timestep: Optional[int], max_timestep: Optional[int], num_train_timesteps: int
) -> tuple[int, int]:
    """[lo, hi) with the "is None" rule: an explicit 0 is kept, spec losses §4."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    if hi <= lo:
        # upstream keeps the values and fails inside torch.randint; we say which options are wrong
        raise UserError(f"--max_timestep ({hi}) must be greater than --min_timestep ({lo}); max_timestep is exclusive")
    return lo, hi


def huber_c_for_timestep(
    t: int, schedule: str, c0: float, alphas_cumprod: torch.Tensor, num_train_timesteps: int
) -> float:
    """c(t) for the constant / exponential / snr schedules, spec losses §5.1."""
    if schedule == "constant":
        return float(c0)
    if schedule == "exponential":
        alpha = -math.log(c0) / num_train_timesteps
        return math.exp(-alpha * t)
    if schedule == "snr":
        # ᾱ_t AFTER the zero-terminal-SNR fix: σ → ∞ at the last step gives c = c0
        a = alphas_cumprod[t].double()
        sigma = torch.sqrt((1.0 - a) / a)
        return float((1 - c0) / (1 + sigma) ** 2 + c0)
    raise UserError(f"--huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {schedule!r}")


def sample_timesteps(
    batch_size: int,
    cfg: NoiseConfig,
    sched: TrainingSchedule,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, Optional[float]]:
    """Integer t in [lo, hi): per sample for l2; one t shared by the batch plus huber_c otherwise, spec §4."""
    lo, hi = timestep_bounds(cfg.min_timestep, cfg.max_timestep, sched.num_train_timesteps)
    gen_device = generator.device if generator is not None else None
    if cfg.loss_type == "l2":
        t = torch.randint(lo, hi, (batch_size,), generator=generator, device=gen_device or device)
        return t.to(device).long(), None
    # huber / smooth_l1: one timestep for the whole batch (pitfall 2), drawn on the CPU upstream
    t = torch.randint(lo, hi, (1,), generator=generator, device=gen_device or "cpu")
    c = huber_c_for_timestep(int(t.item()), cfg.huber_schedule, cfg.huber_c, sched.alphas_cumprod,
                             sched.num_train_timesteps)
    return t.cpu().repeat(batch_size).to(device).long(), c


def make_noisy_latents(
    latents: torch.Tensor,
    cfg: NoiseConfig,
    sched: TrainingSchedule,
    generator: Optional[torch.Generator] = None,
    rng: Optional[random.Random] = None,
) -> NoisyLatents:
    """ε, x_t, t and huber_c in upstream's fixed order, spec losses §3."""
    # 1. base noise
    noise = _randn(tuple(latents.shape), latents.device, latents.dtype, generator)
    # 2. offset noise (upstream tests truthiness here: 0.0 disables it)
    if cfg.noise_offset:
        offset = random_strength(cfg.noise_offset, cfg.noise_offset_random_strength, generator)
        noise = apply_noise_offset(latents, noise, offset, cfg.adaptive_noise_scale, generator)
    # 3. pyramid noise, normalising the offset noise too
    if cfg.multires_noise_iterations:
        noise = pyramid_noise_like(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator, rng)
    # 4. timesteps (and huber_c)
    timesteps, huber_c = sample_timesteps(latents.shape[0], cfg, sched, latents.device, generator)
    # 5. forward process; input perturbation only changes the noisy input, never the target
    model_noise = noise
    if cfg.ip_noise_gamma:
        gamma = random_strength(cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength, generator)
        if isinstance(gamma, torch.Tensor):
            gamma = gamma.to(latents.device)
        model_noise = noise + gamma * _randn(tuple(latents.shape), latents.device, latents.dtype, generator)
    noisy_latents = sched.scheduler.add_noise(latents, model_noise, timesteps)
    return NoisyLatents(noise, noisy_latents, timesteps, huber_c)


def compute_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    sched: TrainingSchedule,
    v_parameterization: bool,
) -> torch.Tensor:
    """ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 via the scheduler's get_velocity, spec losses §7."""
    if v_parameterization:
        return sched.scheduler.get_velocity(latents, noise, timesteps)
    return noise
