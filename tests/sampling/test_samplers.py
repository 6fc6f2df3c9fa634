"""Contract test over every sampler name (spec generation §2)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from library.errors import UserError
from library.sampling.samplers import (
    SAMPLERS,
    TRAINING_ONLY_SAMPLERS,
    ScipyFreeLMSDiscreteScheduler,
    make_scheduler,
)

ALL_NAMES = sorted(SAMPLERS) + sorted(TRAINING_ONLY_SAMPLERS)
SPEC_NAMES = {"ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
              "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"}


def _two_steps(scheduler, seed: int) -> torch.Tensor:
    """Run two scheduler steps on the dummy denoiser eps(x) = 0.1 x with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps[:2]:
        inp = scheduler.scale_model_input(x, t)
        extra = {"generator": gen} if takes_generator else {}
        x = scheduler.step(0.1 * inp, t, x, **extra).prev_sample
    return x


def test_names_are_the_spec_names():
    assert set(SAMPLERS) == SPEC_NAMES


@pytest.mark.parametrize("for_training", [False, True])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_sampler_contract(name: str, for_training: bool):
    if name in TRAINING_ONLY_SAMPLERS and not for_training:
        pytest.skip("training-only name")
    scheduler = make_scheduler(name, v_parameterization=False, for_training=for_training)
    cfg = scheduler.config
    assert cfg.num_train_timesteps == 1000 and cfg.beta_schedule == "scaled_linear"
    assert cfg.beta_start == 0.00085 and cfg.beta_end == 0.012
    assert cfg.prediction_type == "epsilon"

    rebuilt = type(scheduler).from_config(scheduler.config)
    assert dict(rebuilt.config) == dict(scheduler.config)

    a = _two_steps(scheduler, seed=3)
    b = _two_steps(make_scheduler(name, False, for_training), seed=3)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)

    v = make_scheduler(name, v_parameterization=True, for_training=for_training)
    assert v.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_mode_fixups(name: str):
    gen = make_scheduler(name, False, for_training=False).config
    train = make_scheduler(name, False, for_training=True).config
    if "steps_offset" in gen:
        assert gen.steps_offset == 1
        assert train.steps_offset == 0
    if "clip_sample" in gen:
        assert gen.clip_sample is False
        assert train.clip_sample is True


def test_specific_mappings():
    assert type(make_scheduler("ddim", False, False)).__name__ == "DDIMScheduler"
    assert make_scheduler("dpmsolver", False, False).config.algorithm_type == "dpmsolver"
    assert make_scheduler("dpmsolver++", False, False).config.algorithm_type == "dpmsolver++"
    assert "steps_offset" not in make_scheduler("dpmsingle", False, False).config
    assert type(make_scheduler("k_dpm_2_a", False, False)).__name__ == "KDPM2AncestralDiscreteScheduler"
    assert type(make_scheduler("ddpm", False, True)).__name__ == "DDPMScheduler"


def test_unknown_name_training_falls_back_to_ddim(caplog):
    with caplog.at_level("WARNING"):
        s = make_scheduler("no_such", False, for_training=True)
    assert type(s).__name__ == "DDIMScheduler" and s.config.clip_sample is True
    assert "no_such" in caplog.text


def test_unknown_name_generation_is_user_error():
    with pytest.raises(UserError, match="'no_such'.*euler_a"):
        make_scheduler("no_such", False, for_training=False)
    with pytest.raises(UserError):
        make_scheduler("ddpm", False, for_training=False)


def test_lms_coefficients_match_exact_integration():
    s = ScipyFreeLMSDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(10)
    sig = s.sigmas.double().numpy()
    t, order = 5, 4
    for cur in range(order):
        poly = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != cur:
                poly *= np.polynomial.Polynomial([-sig[t - k], 1.0]) / (sig[t - cur] - sig[t - k])
        exact = poly.integ()(sig[t + 1]) - poly.integ()(sig[t])
        assert s.get_lms_coefficient(order, t, cur) == pytest.approx(exact, rel=1e-12, abs=1e-14)
