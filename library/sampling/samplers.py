"""Samplers by name: the Diffusers scheduler behind each `--sampler` / `--sample_sampler` / `--ss` name.

spec generation.md §2. One builder per scheduler, aliases are extra keys of `SAMPLERS`;
`make_scheduler` is the one entry used by gen_img and by sample images during training.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import numpy as np
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from library.errors import UserError

logger = logging.getLogger(__name__)

# common init of every sampler (sd-scripts SCHEDULER_* constants), spec generation §2
SCHEDULER_TIMESTEPS = 1000
SCHEDULER_LINEAR_START = 0.00085
SCHEDULER_LINEAR_END = 0.012
SCHEDULER_SCHEDULE = "scaled_linear"

# Gauss-Legendre rule with 4 nodes: exact for polynomials up to degree 7 (LMS needs degree <= 3)
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


class ScipyFreeLMSDiscreteScheduler(LMSDiscreteScheduler):
    """Diffusers' LMS scheduler without SciPy: the coefficient integral is done by Gauss-Legendre.

    Diffusers integrates the Lagrange basis polynomial with `scipy.integrate.quad`; the integrand is a
    polynomial of degree `order - 1` (<= 3), so a 4-node Gauss-Legendre rule gives the same value exactly
    (up to float rounding) and SciPy, which is not among our dependencies, is not needed.
    """

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Integral of the `current_order`-th Lagrange basis over [sigma_t, sigma_t+1]."""
        sigmas = self.sigmas.double().cpu().numpy()
        lo, hi = sigmas[t], sigmas[t + 1]
        taus = (hi - lo) / 2 * _GL_NODES + (hi + lo) / 2
        basis = np.ones_like(taus)
        for k in range(order):
            if k != current_order:
                basis *= (taus - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k])
        return float((hi - lo) / 2 * np.dot(_GL_WEIGHTS, basis))


def _build(cls: type[SchedulerMixin], v_pred: bool, for_training: bool, **extra: Any) -> SchedulerMixin:
    """Build `cls` with the common args, the mode's fix-ups and the sampler's extra init. spec §2."""
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = dict(
        num_train_timesteps=SCHEDULER_TIMESTEPS,
        beta_start=SCHEDULER_LINEAR_START,
        beta_end=SCHEDULER_LINEAR_END,
        beta_schedule=SCHEDULER_SCHEDULE,
    )
    if for_training:
        # get_my_scheduler keeps Diffusers' defaults (steps_offset 0) but turns clip_sample on where the
        # scheduler has it (upstream flips the FrozenDict attribute; we pass it at init so config == behaviour)
        if "clip_sample" in params:
            kwargs["clip_sample"] = True
    else:
        # gen_img's PipelineLike forces steps_offset=1 and clip_sample=False on any scheduler that has them
        if "steps_offset" in params:
            kwargs["steps_offset"] = 1
        if "clip_sample" in params:
            kwargs["clip_sample"] = False
    if v_pred:
        kwargs["prediction_type"] = "v_prediction"
    kwargs.update(extra)
    return cls(**kwargs)


def _ddim(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """DDIM (the default sampler)."""
    return _build(DDIMScheduler, v_pred, for_training)


def _ddpm(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """DDPM: accepted by training's get_my_scheduler (`--ss ddpm`) but not a listed choice."""
    return _build(DDPMScheduler, v_pred, for_training)


def _pndm(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """PNDM / PLMS."""
    return _build(PNDMScheduler, v_pred, for_training)


def _lms(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """Linear multistep (k-diffusion `lms`), SciPy-free variant of Diffusers' class."""
    return _build(ScipyFreeLMSDiscreteScheduler, v_pred, for_training)


def _euler(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """Euler, Algorithm 2 of Karras et al. 2022 without churn."""
    return _build(EulerDiscreteScheduler, v_pred, for_training)


def _euler_a(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """Euler ancestral (Gradual Latent swaps in its subclass, see gradual_latent.py)."""
    return _build(EulerAncestralDiscreteScheduler, v_pred, for_training)


def _dpmsolver(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """DPM-Solver multistep, `algorithm_type="dpmsolver"`."""
    # Diffusers >= 0.26 defaults final_sigmas_type to "zero", which it rejects for this algorithm;
    # "sigma_min" is what the Diffusers of sd-scripts v0.8.7 (0.25) did for every DPM-Solver
    return _build(DPMSolverMultistepScheduler, v_pred, for_training, algorithm_type="dpmsolver",
                  final_sigmas_type="sigma_min")


def _dpmsolver_pp(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """DPM-Solver++ multistep, `algorithm_type="dpmsolver++"`."""
    return _build(DPMSolverMultistepScheduler, v_pred, for_training, algorithm_type="dpmsolver++")


def _dpmsingle(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """DPM-Solver singlestep (has no steps_offset, so none is set)."""
    return _build(DPMSolverSinglestepScheduler, v_pred, for_training)


def _heun(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """Heun, Algorithm 2 of Karras et al. 2022 (2 model calls per step)."""
    return _build(HeunDiscreteScheduler, v_pred, for_training)


def _dpm_2(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """k-diffusion DPM2."""
    return _build(KDPM2DiscreteScheduler, v_pred, for_training)


def _dpm_2_a(v_pred: bool, for_training: bool) -> SchedulerMixin:
    """k-diffusion DPM2 ancestral (2 noises per step)."""
    return _build(KDPM2AncestralDiscreteScheduler, v_pred, for_training)


SamplerBuilder = Callable[[bool, bool], SchedulerMixin]

# the selectable names of `--sampler` / `--sample_sampler` (spec cli-options, generation §2)
SAMPLERS: dict[str, SamplerBuilder] = {
    "ddim": _ddim,
    "pndm": _pndm,
    "lms": _lms,
    "euler": _euler,
    "euler_a": _euler_a,
    "heun": _heun,
    "dpm_2": _dpm_2,
    "dpm_2_a": _dpm_2_a,
    "dpmsolver": _dpmsolver,
    "dpmsolver++": _dpmsolver_pp,
    "dpmsingle": _dpmsingle,
    "k_lms": _lms,
    "k_euler": _euler,
    "k_euler_a": _euler_a,
    "k_dpm_2": _dpm_2,
    "k_dpm_2_a": _dpm_2_a,
}

# names only training's sample-prompt `--ss` reaches (upstream get_my_scheduler has a ddpm branch)
TRAINING_ONLY_SAMPLERS: dict[str, SamplerBuilder] = {"ddpm": _ddpm}

# noises drawn per step, for pre-drawing reproducible noise (spec generation §2)
NOISES_PER_STEP: dict[str, int] = {"dpm_2_a": 2, "k_dpm_2_a": 2}


def make_scheduler(name: str, v_parameterization: bool, for_training: bool) -> SchedulerMixin:
    """The scheduler for a sampler name: training's get_my_scheduler or gen_img's mapping. spec §2.

    Training: Diffusers' defaults, clip_sample on; an unknown name falls back to DDIM with a warning.
    Generation: steps_offset=1, clip_sample off; an unknown name is a UserError listing the valid ones.
    """
    builder = SAMPLERS.get(name)
    if builder is None and for_training:
        builder = TRAINING_ONLY_SAMPLERS.get(name)
        if builder is None:
            logger.warning("unknown sampler %r for sample images, using ddim", name)
            builder = _ddim
    if builder is None:
        raise UserError(f"--sampler {name!r} is not a sampler; choose one of: {', '.join(SAMPLERS)}")
    return builder(v_parameterization, for_training)
