"""FLUX.1 flow-matching objective pieces, as sd-scripts' flux_train_network.py (library/flux_train_utils.py).

sigma in (0, 1) is drawn per sample by ``--timestep_sampling``; the model input is
``(1 - sigma) * latents + sigma * noise``, the target ``noise - latents``; ``--model_prediction_type`` turns the
transformer's output into the compared prediction (``sigma_scaled``: ``noisy - sigma * pred``, with the
``--weighting_scheme`` loss weight). Every draw takes an explicit generator, in upstream's order: noise, sigmas,
then the input-perturbation noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from library.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
# flux_shift: mu on the line through (256 image tokens, 0.5) and (4096, 1.15), as FLUX.1 dev's sampling schedule
_BASE_SEQ, _MAX_SEQ, _BASE_SHIFT, _MAX_SHIFT = 256, 4096, 0.5, 1.15


@dataclass(frozen=True)
class FlowMatchingConfig:
    """The FLUX.1 objective options (upstream's names and defaults)."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    model_prediction_type: str = "sigma_scaled"
    guidance_scale: float = 3.5
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS),
                                     ("model_prediction_type", self.model_prediction_type, PREDICTION_TYPES),
                                     ("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)):
            if value not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")


def shifted_schedule(shift: float, n: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of upstream's ``FlowMatchEulerDiscreteScheduler(n, shift)``: t = n .. 1, sigma = t / n
    shifted by ``shift * s / (1 + (shift - 1) * s)``, timesteps = sigma * n."""
    t = torch.linspace(1, n, n, dtype=torch.float32).flip(0)
    s = t / n
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas * n, sigmas


def _density(cfg: FlowMatchingConfig, bsz: int, generator: torch.Generator) -> torch.Tensor:
    """u in [0, 1) of ``--weighting_scheme`` (SD3's ``compute_density_for_timestep_sampling``)."""
    dev = generator.device
    if cfg.weighting_scheme == "logit_normal":
        z = torch.randn(bsz, generator=generator, device=dev) * cfg.logit_std + cfg.logit_mean
        return torch.sigmoid(z)
    u = torch.rand(bsz, generator=generator, device=dev)
    if cfg.weighting_scheme == "mode":
        u = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flux_shift_mu(image_tokens: int) -> float:
    slope = (_MAX_SHIFT - _BASE_SHIFT) / (_MAX_SEQ - _BASE_SEQ)
    return _BASE_SHIFT + slope * (image_tokens - _BASE_SEQ)


def sample_sigmas(cfg: FlowMatchingConfig, bsz: int, latent_hw: tuple[int, int],
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps = sigmas * 1000), each (B,) float32 on the generator's device."""
    dev = generator.device
    kind = cfg.timestep_sampling
    if kind == "uniform":
        sigmas = torch.rand(bsz, generator=generator, device=dev)
    elif kind in ("sigmoid", "shift", "flux_shift"):
        sigmas = torch.sigmoid(cfg.sigmoid_scale * torch.randn(bsz, generator=generator, device=dev))
        if kind == "shift":
            shift = cfg.discrete_flow_shift
            sigmas = (sigmas * shift) / (1 + (shift - 1) * sigmas)
        elif kind == "flux_shift":
            h, w = latent_hw
            mu = flux_shift_mu((h // 2) * (w // 2))  # image tokens after 2x2 packing
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    else:  # "sigma": a step of the shifted discrete schedule, drawn by --weighting_scheme
        timesteps, table = shifted_schedule(cfg.discrete_flow_shift)
        # u may round to 1.0 in float32 (logit_normal): upstream would index past the table's end
        idx = (_density(cfg, bsz, generator) * NUM_TRAIN_TIMESTEPS).long().clamp(max=NUM_TRAIN_TIMESTEPS - 1)
        idx = idx.cpu()
        return table[idx].to(dev), timesteps[idx].to(dev)
    return sigmas, sigmas * NUM_TRAIN_TIMESTEPS


def noisy_model_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, cfg: FlowMatchingConfig,
                      generator: torch.Generator) -> torch.Tensor:
    """``(1 - sigma) * latents + sigma * noise``; with ``--ip_noise_gamma`` the noise gets ``gamma * xi`` added
    (``xi`` drawn after the sigmas; a random strength ``U[0,1) * gamma`` after ``xi``)."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    if cfg.ip_noise_gamma:
        xi = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
        gamma = cfg.ip_noise_gamma
        if cfg.ip_noise_gamma_random_strength:
            gamma = torch.rand(1, generator=generator, device=generator.device).to(latents) * gamma
        noise = noise + gamma * xi
    return (1.0 - s) * latents + s * noise


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """SD3's ``compute_loss_weighting_for_sd3``: sigma^-2, cosmap ``2 / (pi (1 - 2s + 2s^2))``, else ones."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def apply_prediction_type(cfg: FlowMatchingConfig, pred: torch.Tensor, noisy: torch.Tensor,
                          sigmas: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(prediction compared with ``noise - latents``, loss weighting or None), upstream's
    ``apply_model_prediction_type``. ``sigma_scaled`` keeps upstream's formula as it is: ``noisy - sigma * pred``
    estimates the clean latents, yet is compared with the velocity target (its docs advise ``raw``)."""
    if cfg.model_prediction_type == "raw":
        return pred, None
    if cfg.model_prediction_type == "additive":
        return pred + noisy, None
    s = sigmas.view(-1, *([1] * (pred.ndim - 1)))
    return pred * (-s) + noisy, loss_weighting(cfg.weighting_scheme, s)


def huber_c_for_sigmas(timesteps: torch.Tensor, schedule: str, huber_c: float) -> Optional[torch.Tensor]:
    """Per-sample Huber threshold of upstream's ``get_huber_threshold_if_needed`` (``--huber_scale`` 1):
    ``exponential`` ``exp(-alpha t)`` with ``alpha = -ln(c) / 1000``, ``constant`` c; ``snr`` has no
    meaning without a noise schedule (upstream raises)."""
    if schedule == "exponential":
        alpha = -math.log(huber_c) / NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * timesteps.float())
    if schedule == "constant":
        return torch.full(timesteps.shape, float(huber_c), device=timesteps.device)
    raise UserError(f"--huber_schedule {schedule} is not supported for FLUX.1 (no SNR in flow matching): "
                    "use exponential or constant")
