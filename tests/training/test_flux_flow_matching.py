"""FLUX.1 flow-matching pieces against sd-scripts' formulas written out by hand (library/flux_train_utils.py)."""
import math

import numpy as np
import pytest
import torch

from library.errors import UserError
from library.training.objective.flow_matching import (FlowMatchingConfig, apply_prediction_type, huber_c_for_sigmas,
                                                      noisy_model_input, sample_sigmas)

B = 6


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def _by_hand(kind, seed, h=8, w=12, scale=1.0, shift=3.0):
    """Upstream's get_noisy_model_input_and_timesteps, each branch typed out, drawing from the same generator."""
    g = _gen(seed)
    if kind == "uniform":
        return torch.rand(B, generator=g)
    z = torch.randn(B, generator=g) * scale
    s = 1 / (1 + torch.exp(-z))
    if kind == "sigmoid":
        return s
    if kind == "shift":
        return (s * shift) / (1 + (shift - 1) * s)
    m = (1.15 - 0.5) / (4096 - 256)  # flux_shift: get_lin_function(y1=0.5, y2=1.15) at (h // 2) * (w // 2)
    mu = m * ((h // 2) * (w // 2)) + (0.5 - m * 256)
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)


@pytest.mark.parametrize("kind", ["uniform", "sigmoid", "shift", "flux_shift"])
@pytest.mark.parametrize("scale,shift", [(1.0, 3.0), (2.5, 1.5)])
def test_timestep_sampling_matches_upstream_formula(kind, scale, shift):
    cfg = FlowMatchingConfig(timestep_sampling=kind, sigmoid_scale=scale, discrete_flow_shift=shift)
    sigmas, timesteps = sample_sigmas(cfg, B, (8, 12), _gen(11))
    want = _by_hand(kind, 11, scale=scale, shift=shift)
    assert torch.allclose(sigmas, want, atol=1e-6)
    assert torch.allclose(timesteps, want * 1000, atol=1e-3)
    assert sigmas.shape == (B,) and bool(((sigmas > 0) & (sigmas < 1)).all())


def _upstream_schedule(shift):
    """sd3_train_utils.FlowMatchEulerDiscreteScheduler(1000, shift).__init__, in numpy."""
    t = np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy()
    s = t / 1000
    s = shift * s / (1 + (shift - 1) * s)
    return s * 1000, s


@pytest.mark.parametrize("scheme", ["uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_sigma_sampling_indexes_the_shifted_schedule(scheme):
    cfg = FlowMatchingConfig(timestep_sampling="sigma", weighting_scheme=scheme, discrete_flow_shift=3.1582,
                             logit_mean=0.2, logit_std=1.3, mode_scale=1.29)
    sigmas, timesteps = sample_sigmas(cfg, B, (8, 8), _gen(5))
    g = _gen(5)
    if scheme == "logit_normal":  # compute_density_for_timestep_sampling, by hand
        u = 1 / (1 + np.exp(-(torch.randn(B, generator=g).numpy() * 1.3 + 0.2)))
    else:
        u = torch.rand(B, generator=g).numpy()
        if scheme == "mode":
            u = 1 - u - 1.29 * (np.cos(math.pi * u / 2) ** 2 - 1 + u)
    idx = (u * 1000).astype(np.int64)
    ts, ss = _upstream_schedule(3.1582)
    np.testing.assert_allclose(timesteps.numpy(), ts[idx], rtol=1e-6)
    np.testing.assert_allclose(sigmas.numpy(), ss[idx], rtol=1e-6)


def test_noisy_input_and_ip_noise():
    lat, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    s = torch.tensor([0.25, 0.9])
    plain = noisy_model_input(lat, noise, s, FlowMatchingConfig(), _gen())
    assert torch.allclose(plain, (1 - s.view(-1, 1, 1, 1)) * lat + s.view(-1, 1, 1, 1) * noise)
    cfg = FlowMatchingConfig(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    got = noisy_model_input(lat, noise, s, cfg, _gen(2))
    g = _gen(2)
    xi = torch.randn(lat.shape, generator=g)
    gamma = torch.rand(1, generator=g) * 0.1
    sv = s.view(-1, 1, 1, 1)
    assert torch.allclose(got, (1 - sv) * lat + sv * (noise + gamma * xi))


@pytest.mark.parametrize("ptype", ["raw", "additive", "sigma_scaled"])
@pytest.mark.parametrize("scheme", ["uniform", "sigma_sqrt", "cosmap"])
def test_model_prediction_types(ptype, scheme):
    pred, noisy = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    s = torch.tensor([0.1, 0.5, 0.8])
    out, weighting = apply_prediction_type(FlowMatchingConfig(model_prediction_type=ptype, weighting_scheme=scheme),
                                           pred, noisy, s)
    sv = s.view(-1, 1, 1, 1)
    if ptype == "raw":
        assert torch.equal(out, pred) and weighting is None
    elif ptype == "additive":
        assert torch.allclose(out, pred + noisy) and weighting is None
    else:
        assert torch.allclose(out, pred * (-sv) + noisy)
        want = {"uniform": torch.ones_like(sv), "sigma_sqrt": sv ** -2.0,
                "cosmap": 2 / (math.pi * (1 - 2 * sv + 2 * sv ** 2))}[scheme]
        assert torch.allclose(weighting, want)


def test_huber_thresholds():
    t = torch.tensor([0.0, 500.0, 1000.0])
    assert torch.allclose(huber_c_for_sigmas(t, "exponential", 0.1), torch.exp(math.log(0.1) / 1000 * t))
    assert torch.allclose(huber_c_for_sigmas(t, "constant", 0.3), torch.full((3,), 0.3))
    with pytest.raises(UserError, match="snr"):
        huber_c_for_sigmas(t, "snr", 0.1)


def test_bad_choice_is_one_line():
    with pytest.raises(UserError, match="--timestep_sampling must be one of"):
        FlowMatchingConfig(timestep_sampling="logit")
