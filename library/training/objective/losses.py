"""Element-wise losses, SNR-based weights, masked loss and the reduction pipeline, spec losses §5, §8.

Each weighting term is a small pure function of the per-sample SNR; :func:`reduce_and_weight` applies them
once, in the spec's order, for every training method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from library.errors import UserError
from library.training.objective.noise import LOSS_TYPES, check_loss_choices
from library.training.objective.noise_schedule import TrainingSchedule

SNR_CLAMP = 1000.0  # upstream clamps SNR here for every weight except min-SNR (SNR_0 ≈ 1175 otherwise)

# Script letters of spec cli-options: N/X train_network, D train_db, F fine_tune, T textual inversion.
METHODS = ("N", "X", "D", "F", "T")

HuberC = Union[None, float, torch.Tensor]


@dataclass(frozen=True)
class LossConfig:
    """The options that shape the loss (spec cli-options §4.4, §5, §10), normalised for one method."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    min_snr_gamma: Optional[float] = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None
    debiased_estimation_loss: bool = False
    v_parameterization: bool = False
    masked_loss: bool = False
    method: str = "N"

    def __post_init__(self) -> None:
        check_loss_choices(self.loss_type, self.huber_schedule)
        if self.method not in METHODS:
            raise ValueError(f"unknown training method letter {self.method!r}; expected one of {METHODS}")

    @property
    def uses_snr(self) -> bool:
        """Whether any SNR-based weighting term is on."""
        return bool(self.min_snr_gamma or self.scale_v_pred_loss_like_noise_pred or self.v_pred_like_loss
                    or self.debiased_estimation_loss)

    @property
    def uses_loss_weights(self) -> bool:
        """fine_tune ignores per-sample (prior) loss weights, spec losses §8."""
        return self.method != "F"


def _per_sample(value: HuberC, like: torch.Tensor) -> HuberC:
    """Broadcast a (B,) tensor over the remaining dims of ``like``; scalars pass through."""
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        return value.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return value


def conditional_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: HuberC = 0.1
) -> torch.Tensor:
    """Element-wise l2, or pseudo-Huber (huber / smooth_l1) loss, reduction none, spec losses §5."""
    pred, target = pred.float(), target.float()  # predictions are cast to fp32 before the loss (pitfall 8)
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    c = _per_sample(huber_c, pred)
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    raise UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, v_pred: bool) -> torch.Tensor:
    """min(SNR, γ)/SNR, or min(SNR, γ)/(SNR+1) for v-prediction; SNR NOT clamped, spec losses §8."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return (clipped / (snr + 1) if v_pred else clipped / snr).float()


def _clamp_snr(snr: torch.Tensor) -> torch.Tensor:
    """min(SNR, 1000): keeps the t=0 SNR finite-sized for the non-min-SNR weights, spec losses §8."""
    return torch.minimum(snr, torch.full_like(snr, SNR_CLAMP))


def scale_v_pred_like_noise_weight(snr: torch.Tensor) -> torch.Tensor:
    """SNRc/(SNRc+1), makes v-pred loss magnitudes look like ε-pred ones, spec losses §8."""
    snr_c = _clamp_snr(snr)
    return snr_c / (snr_c + 1)


def v_pred_like_loss_factor(snr: torch.Tensor, value: float) -> torch.Tensor:
    """Total factor 1 + v·(SNRc+1)/SNRc of ``L + v·L/scale``, spec losses §8."""
    return 1 + value / scale_v_pred_like_noise_weight(snr)


def debiased_weight(snr: torch.Tensor) -> torch.Tensor:
    """1/√SNRc, debiased estimation loss, spec losses §8."""
    return 1 / torch.sqrt(_clamp_snr(snr))


def loss_mask(
    latent_size: tuple[int, int],
    conditioning_images: Optional[torch.Tensor] = None,
    alpha_masks: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """(B,1,h,w) weight in [0,1] from a conditioning image's R channel or an alpha mask, spec losses §8.1."""
    if conditioning_images is not None:  # takes precedence over alpha masks
        m = conditioning_images[:, 0].unsqueeze(1).float()  # R channel, values in [-1, 1]
        return F.interpolate(m, size=tuple(latent_size), mode="area") / 2 + 0.5
    if alpha_masks is not None:  # [v0.9.0+] alpha/255 already in [0, 1]: no /2+0.5
        m = alpha_masks.unsqueeze(1).float()
        return F.interpolate(m, size=tuple(latent_size), mode="area")
    return None


def loss_mask_from_batch(batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Optional[torch.Tensor]:
    """:func:`loss_mask` reading ``conditioning_images`` / ``alpha_masks`` from a batch dict."""
    return loss_mask(latent_size, batch.get("conditioning_images"), batch.get("alpha_masks"))


def reduce_and_weight(
    loss_elem: torch.Tensor,
    timesteps: torch.Tensor,
    loss_weights: Optional[torch.Tensor],
    sched: TrainingSchedule,
    cfg: LossConfig,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Element loss (B,C,h,w) → scalar: mask, spatial mean, weights, SNR terms, batch mean; spec losses §8."""
    loss = loss_elem
    # 1. masked loss: no renormalisation by mask area (pitfall 4); without a mask the loss is unchanged
    if cfg.masked_loss and mask is not None:
        loss = loss * mask.to(loss.device, loss.dtype)
    # 2. mean over every element of each sample, masked ones included
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    # 3. prior-preservation weights (1.0 for non-regularisation images)
    if loss_weights is not None and cfg.uses_loss_weights:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    # 4. SNR-based terms use all_snr of the ORIGINAL schedule, even with --zero_terminal_snr (pitfall 1)
    if cfg.uses_snr:
        snr = sched.snr(timesteps).to(loss.device)
        if cfg.min_snr_gamma:
            loss = loss * min_snr_weight(snr, cfg.min_snr_gamma, cfg.v_parameterization)
        if cfg.scale_v_pred_loss_like_noise_pred:
            loss = loss * scale_v_pred_like_noise_weight(snr)
        if cfg.v_pred_like_loss:
            loss = loss * v_pred_like_loss_factor(snr, cfg.v_pred_like_loss)
        if cfg.debiased_estimation_loss:
            loss = loss * debiased_weight(snr)
    # 5. mean over the batch
    return loss.mean()
