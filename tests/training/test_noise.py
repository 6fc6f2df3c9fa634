"""Noise schedule, noise tricks, timestep sampling and target against hand-written formulas (spec losses §1-§7)."""
import argparse
import math
import random

import pytest
import torch

from library.errors import UserError
from library.training.objective.noise import (
    NoiseConfig,
    apply_noise_offset,
    compute_target,
    huber_c_for_timestep,
    make_noisy_latents,
    pyramid_noise_like,
    sample_timesteps,
    timestep_bounds,
)
from library.training.objective.noise_schedule import build_training_schedule

TS = (0, 500, 999)


def ref_alphas_cumprod() -> torch.Tensor:
    """ᾱ_t computed independently in float64 from the spec's betas."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def ref_ztsnr_alphas_cumprod() -> torch.Tensor:
    """ᾱ after the zero-terminal-SNR rescale, spec §6, in float64."""
    a = ref_alphas_cumprod().sqrt()
    a0, at = a[0].item(), a[-1].item()
    return ((a - at) * a0 / (a0 - at)) ** 2


# ---------------------------------------------------------------- schedule (§1, §6)

def test_schedule_matches_spec_betas_and_snr():
    s = build_training_schedule()
    ref = ref_alphas_cumprod()
    torch.testing.assert_close(s.alphas_cumprod.double(), ref, rtol=1e-5, atol=1e-7)
    for t in TS:
        snr = ref[t] / (1 - ref[t])
        assert s.all_snr[t].item() == pytest.approx(snr.item(), rel=1e-4)
    assert s.all_snr[0].item() == pytest.approx(1175, rel=0.01)  # the value the spec quotes
    assert s.snr(torch.tensor([0, 999])).shape == (2,)


def test_zero_terminal_snr_replaces_schedule_but_not_all_snr():
    plain = build_training_schedule()
    z = build_training_schedule(zero_terminal_snr=True, v_parameterization=True)
    assert z.alphas_cumprod[-1].item() == 0.0
    assert z.scheduler.betas[-1].item() == pytest.approx(1.0)
    torch.testing.assert_close(z.all_snr, plain.all_snr, rtol=0, atol=0)
    torch.testing.assert_close(z.alphas_cumprod.double(), ref_ztsnr_alphas_cumprod(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z.scheduler.alphas, 1 - z.scheduler.betas)
    # add_noise uses the new values: pure noise at the last step
    x0, eps = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3.0)
    torch.testing.assert_close(z.scheduler.add_noise(x0, eps, torch.tensor([999])), eps)


def test_zero_terminal_snr_warns_without_v_pred(caplog):
    with caplog.at_level("WARNING"):
        build_training_schedule(zero_terminal_snr=True)
    assert "v_parameterization" in caplog.text


# ---------------------------------------------------------------- huber_c (§5.1)

@pytest.mark.parametrize("t", TS)
def test_huber_c_schedules(t):
    c0 = 0.1
    ac = build_training_schedule().alphas_cumprod
    assert huber_c_for_timestep(t, "constant", c0, ac, 1000) == c0
    assert huber_c_for_timestep(t, "exponential", c0, ac, 1000) == pytest.approx(math.exp(math.log(c0) * t / 1000))
    a = ref_alphas_cumprod()[t].item()
    sigma = math.sqrt((1 - a) / a)
    assert huber_c_for_timestep(t, "snr", c0, ac, 1000) == pytest.approx((1 - c0) / (1 + sigma) ** 2 + c0, rel=1e-5)


def test_huber_c_exponential_end_points_and_snr_with_ztsnr():
    ac = build_training_schedule(zero_terminal_snr=True, v_parameterization=True).alphas_cumprod
    assert huber_c_for_timestep(0, "exponential", 0.1, ac, 1000) == 1.0
    assert huber_c_for_timestep(1000, "exponential", 0.1, ac, 1000) == pytest.approx(0.1)
    # σ → ∞ at the terminal step after the fix, so c = c0 exactly
    assert huber_c_for_timestep(999, "snr", 0.1, ac, 1000) == pytest.approx(0.1, abs=1e-12)
    a = ref_ztsnr_alphas_cumprod()[500].item()
    expected = 0.9 / (1 + math.sqrt((1 - a) / a)) ** 2 + 0.1
    assert huber_c_for_timestep(500, "snr", 0.1, ac, 1000) == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- offset noise (§3.1)

def test_offset_noise_formula():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = apply_noise_offset(latents, noise, 0.1, None, torch.Generator().manual_seed(7))
    z = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, noise + 0.1 * z)


def test_adaptive_offset_noise_is_clamped_at_zero():
    latents = torch.zeros(1, 2, 4, 4)
    latents[0, 0] = 3.0  # |mean| = 3 on channel 0, 0 on channel 1
    noise = torch.zeros(1, 2, 4, 4)
    out = apply_noise_offset(latents, noise, 0.1, -0.5, torch.Generator().manual_seed(3))
    z = torch.randn(1, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    o = torch.tensor([max(0.0, 0.1 - 0.5 * 3.0), 0.1]).view(1, 2, 1, 1)
    torch.testing.assert_close(out, noise + o * z)
    assert torch.all(out[0, 0] == 0)  # clamped strength


# ---------------------------------------------------------------- pyramid noise (§3.2)

def upstream_pyramid(noise, device, iterations=6, discount=0.4):
    """sd-scripts v0.8.7 pyramid_noise_like verbatim (global RNGs, in place), as the oracle."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear").to(device)
    for i in range(iterations):
        r = random.random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn).to(device)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_pyramid_noise_shape_std_determinism():
    base = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    a = pyramid_noise_like(base, 8, 0.3, torch.Generator().manual_seed(1), random.Random(2))
    b = pyramid_noise_like(base, 8, 0.3, torch.Generator().manual_seed(1), random.Random(2))
    c = pyramid_noise_like(base, 8, 0.3, torch.Generator().manual_seed(1), random.Random(3))
    assert a.shape == base.shape
    assert a.std().item() == pytest.approx(1.0, abs=1e-5)  # torch std is the unbiased one
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert not torch.equal(base, a)  # input not modified in place


def test_pyramid_noise_matches_upstream_with_global_rngs():
    base = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(0))
    random.seed(5)
    torch.manual_seed(6)
    ours = pyramid_noise_like(base, 6, 0.3)
    random.seed(5)
    torch.manual_seed(6)
    theirs = upstream_pyramid(base.clone(), "cpu", 6, 0.3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_pyramid_noise_breaks_at_one_pixel():
    class Counting(random.Random):
        calls = 0

        def random(self):
            Counting.calls += 1
            return 0.0  # r = 2: sizes 8, 4, 2, 1 → break after the 4th level

    pyramid_noise_like(torch.zeros(1, 1, 8, 8), 10, 0.3, torch.Generator().manual_seed(0), Counting())
    assert Counting.calls == 4


# ---------------------------------------------------------------- timesteps (§4)

def test_timestep_bounds_is_none_rule():
    assert timestep_bounds(None, None, 1000) == (0, 1000)
    assert timestep_bounds(0, 5, 1000) == (0, 5)
    with pytest.raises(UserError, match="--max_timestep"):
        timestep_bounds(None, 0, 1000)  # explicit 0 is kept, not replaced by 1000


def test_l2_timesteps_per_sample_in_half_open_range():
    sched = build_training_schedule()
    cfg = NoiseConfig(min_timestep=100, max_timestep=103)
    t, c = sample_timesteps(512, cfg, sched, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert c is None and t.dtype == torch.long
    assert set(t.tolist()) == {100, 101, 102}  # hi exclusive, every value reached


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_huber_timesteps_shared_by_batch(loss_type):
    sched = build_training_schedule()
    cfg = NoiseConfig(loss_type=loss_type, huber_schedule="exponential", max_timestep=1000)
    t, c = sample_timesteps(6, cfg, sched, torch.device("cpu"), torch.Generator().manual_seed(4))
    assert t.shape == (6,) and len(set(t.tolist())) == 1
    assert c == pytest.approx(math.exp(math.log(0.1) * t[0].item() / 1000))


# ---------------------------------------------------------------- whole step (§3, §7)

def test_make_noisy_latents_order_and_ip_noise_leaves_target():
    sched = build_training_schedule()
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = NoiseConfig(noise_offset=0.1, ip_noise_gamma=0.2)
    noise, noisy, t, c = make_noisy_latents(x0, cfg, sched, torch.Generator().manual_seed(9), random.Random(0))
    # redo the draws by hand in the spec's order: ε, z (offset), t, ξ (ip)
    g = torch.Generator().manual_seed(9)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    eps = eps + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    t_ref = torch.randint(0, 1000, (2,), generator=g)
    xi = torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(noise, eps)
    torch.testing.assert_close(t, t_ref)
    ac = ref_alphas_cumprod()[t_ref].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, ac.sqrt() * x0 + (1 - ac).sqrt() * (eps + 0.2 * xi), rtol=1e-5, atol=1e-5)
    assert c is None
    torch.testing.assert_close(compute_target(x0, noise, t, sched, False), eps)


def test_noise_config_from_options_is_deterministic():
    """The options become a NoiseConfig once (settings.from_options); the same seeds give the same draws."""
    from library.training.settings.from_options import noise_config

    sched = build_training_schedule()
    options = argparse.Namespace(noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.01,
                                 multires_noise_iterations=4, multires_noise_discount=0.3, ip_noise_gamma=0.1,
                                 ip_noise_gamma_random_strength=True, min_timestep=None, max_timestep=None,
                                 loss_type="huber", huber_schedule="snr", huber_c=0.1)
    cfg = noise_config(options)
    assert cfg.noise_offset == 0.05 and cfg.ip_noise_gamma_random_strength and not cfg.v_parameterization
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a = make_noisy_latents(x0, cfg, sched, torch.Generator().manual_seed(1), random.Random(1))
    b = make_noisy_latents(x0, cfg, sched, torch.Generator().manual_seed(1), random.Random(1))
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert a.huber_c == b.huber_c and 0.1 <= a.huber_c <= 1.0
    assert a.noise.std().item() == pytest.approx(1.0, abs=1e-5)  # pyramid normalises the offset noise too


@pytest.mark.parametrize("t", TS)
def test_velocity_target(t):
    sched = build_training_schedule()
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    a = ref_alphas_cumprod()[t].item()
    v = compute_target(x0, eps, torch.tensor([t]), sched, True)
    torch.testing.assert_close(v, math.sqrt(a) * eps - math.sqrt(1 - a) * x0, rtol=1e-5, atol=1e-6)


def test_noise_config_rejects_bad_loss_type():
    with pytest.raises(UserError, match="--loss_type"):
        NoiseConfig(loss_type="l1")
