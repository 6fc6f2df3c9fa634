"""The DDPM noise schedule used for training, with SNR table and zero-terminal-SNR fix (spec losses §1, §6)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

logger = logging.getLogger(__name__)

BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class TrainingSchedule:
    """A diffusers DDPMScheduler plus the SNR table computed before any rescale (spec losses §1)."""

    scheduler: DDPMScheduler
    all_snr: torch.Tensor  # SNR_t of the ORIGINAL schedule, even with --zero_terminal_snr (spec §6)
    zero_terminal_snr: bool = False

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t as the scheduler uses it (after the zero-terminal-SNR fix when enabled)."""
        return self.scheduler.alphas_cumprod

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR_t from ``all_snr`` for a batch of integer timesteps, on the timesteps' device."""
        return self.all_snr.to(timesteps.device)[timesteps.long()]


def compute_all_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR_t = (√ᾱ_t / √(1−ᾱ_t))², as upstream's prepare_scheduler_for_custom_training (spec losses §1)."""
    alpha = torch.sqrt(alphas_cumprod)
    sigma = torch.sqrt(1.0 - alphas_cumprod)
    return (alpha / sigma) ** 2


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that ᾱ_T = 0 (Lin et al. 2023, arXiv:2305.08891), spec losses §6."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0 = alphas_bar_sqrt[0].clone()
    a_t = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - a_t) * (a0 / (a0 - a_t))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def apply_zero_terminal_snr(scheduler: DDPMScheduler) -> None:
    """Replace the scheduler's betas, alphas and alphas_cumprod in place, spec losses §6."""
    betas = zero_terminal_snr_betas(scheduler.betas)
    alphas = 1.0 - betas
    scheduler.betas = betas
    scheduler.alphas = alphas
    # upstream recomputes ᾱ as cumprod(α) rather than reusing the rescaled ᾱ: same up to float32 rounding,
    # and the terminal value is exactly 0 because α_T = 0.
    scheduler.alphas_cumprod = torch.cumprod(alphas, dim=0)


def build_training_schedule(zero_terminal_snr: bool = False, v_parameterization: bool = False) -> TrainingSchedule:
    """Training DDPMScheduler (same for SD1/SD2/SDXL) with all_snr, then the optional ZTSNR fix (spec §1, §6)."""
    scheduler = DDPMScheduler(
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        clip_sample=False,
    )
    # computed BEFORE the rescale on purpose: min-SNR, debiased and v-pred scaling keep the old SNR (pitfall 1)
    all_snr = compute_all_snr(scheduler.alphas_cumprod)
    if zero_terminal_snr:
        if not v_parameterization:
            logger.warning("zero_terminal_snr is enabled, but v_parameterization is not enabled; "
                           "training may be unstable")
        apply_zero_terminal_snr(scheduler)
    return TrainingSchedule(scheduler=scheduler, all_snr=all_snr, zero_terminal_snr=zero_terminal_snr)
