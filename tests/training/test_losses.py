"""Element losses, weights, masked loss and the weighting pipeline vs hand-written formulas (spec losses §5, §8)."""
import argparse
import math

import pytest
import torch

from library.errors import UserError
from library.training.objective.losses import (
    LossConfig,
    conditional_loss,
    debiased_weight,
    loss_mask,
    loss_mask_from_batch,
    min_snr_weight,
    reduce_and_weight,
    scale_v_pred_like_noise_weight,
    v_pred_like_loss_factor,
)
from library.training.objective.noise_schedule import build_training_schedule
from library.training.settings.from_options import loss_config

TS = (0, 500, 999)


def ref_snr(t: int) -> float:
    """SNR_t computed independently in float64 from the spec's betas."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, dim=0)[t].item()
    return a / (1 - a)


@pytest.fixture(scope="module")
def sched():
    return build_training_schedule()


# ---------------------------------------------------------------- element losses (§5)

def test_element_losses_match_formulas():
    pred = torch.tensor([[0.0, 0.5, -2.0, 10.0]]).view(1, 1, 2, 2)
    target = torch.zeros_like(pred)
    d = pred - target
    c = 0.3
    torch.testing.assert_close(conditional_loss(pred, target, "l2"), d**2)
    torch.testing.assert_close(conditional_loss(pred, target, "huber", c), 2 * c * (torch.sqrt(d**2 + c**2) - c))
    torch.testing.assert_close(conditional_loss(pred, target, "smooth_l1", c), 2 * (torch.sqrt(d**2 + c**2) - c))


def test_pseudo_huber_limits():
    c = 0.1
    small, big = torch.full((1, 1, 1, 1), 1e-3), torch.full((1, 1, 1, 1), 1e3)
    zero = torch.zeros(1, 1, 1, 1)
    assert conditional_loss(small, zero, "huber", c).item() == pytest.approx(1e-6, rel=1e-3)  # ≈ δ²
    assert conditional_loss(small, zero, "smooth_l1", c).item() == pytest.approx(1e-6 / c, rel=1e-3)  # ≈ δ²/c
    assert conditional_loss(big, zero, "huber", c).item() == pytest.approx(2 * c * 1e3, rel=1e-3)  # ≈ 2c|δ|
    assert conditional_loss(big, zero, "smooth_l1", c).item() == pytest.approx(2e3, rel=1e-3)  # ≈ 2|δ|


def test_huber_c_per_sample_broadcasts_and_output_is_fp32():
    pred = torch.ones(2, 3, 2, 2, dtype=torch.float16)
    target = torch.zeros(2, 3, 2, 2)
    cs = torch.tensor([0.1, 1.0])
    out = conditional_loss(pred, target, "huber", cs)
    assert out.dtype == torch.float32 and out.shape == pred.shape
    for i, c in enumerate(cs.tolist()):
        torch.testing.assert_close(out[i], torch.full((3, 2, 2), 2 * c * (math.sqrt(1 + c * c) - c)))


# ---------------------------------------------------------------- weights (§8)

@pytest.mark.parametrize("t", TS)
def test_weights_on_three_timesteps(sched, t):
    snr = sched.snr(torch.tensor([t]))
    s = ref_snr(t)
    sc = min(s, 1000.0)
    assert min_snr_weight(snr, 5.0, False).item() == pytest.approx(min(s, 5) / s, rel=1e-4)
    assert min_snr_weight(snr, 5.0, True).item() == pytest.approx(min(s, 5) / (s + 1), rel=1e-4)
    assert scale_v_pred_like_noise_weight(snr).item() == pytest.approx(sc / (sc + 1), rel=1e-4)
    assert v_pred_like_loss_factor(snr, 0.2).item() == pytest.approx(1 + 0.2 * (sc + 1) / sc, rel=1e-4)
    assert debiased_weight(snr).item() == pytest.approx(1 / math.sqrt(sc), rel=1e-4)


def test_snr_clamp_applies_to_all_but_min_snr(sched):
    snr = sched.snr(torch.tensor([0]))
    assert snr.item() > 1000  # ≈ 1175
    assert min_snr_weight(snr, 2000.0, True).item() == pytest.approx(ref_snr(0) / (ref_snr(0) + 1), rel=1e-4)
    assert scale_v_pred_like_noise_weight(snr).item() == pytest.approx(1000 / 1001, rel=1e-6)
    assert debiased_weight(snr).item() == pytest.approx(1 / math.sqrt(1000), rel=1e-6)


# ---------------------------------------------------------------- masked loss (§8.1)

def test_masked_loss_by_hand():
    cond = -torch.ones(1, 3, 4, 4)
    cond[0, 0, :2, :] = 1.0  # R channel: top half white
    cond[0, 0, 2, 0] = 1.0  # one white pixel in the bottom-left 2x2 block → area mean -0.5 → m = 0.25
    cond[0, 1:] = 7.0  # G and B channels are ignored
    m = loss_mask((2, 2), conditioning_images=cond)
    torch.testing.assert_close(m, torch.tensor([[[[1.0, 1.0], [0.25, 0.0]]]]))
    cfg = LossConfig(masked_loss=True)
    loss = reduce_and_weight(torch.ones(1, 4, 2, 2), torch.tensor([10]), None, build_training_schedule(), cfg, m)
    assert loss.item() == pytest.approx((1 + 1 + 0.25 + 0) / 4)  # not renormalised by mask area


def test_alpha_mask_has_no_rescale_and_conditioning_wins():
    alpha = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    torch.testing.assert_close(loss_mask((2, 2), alpha_masks=alpha), alpha.unsqueeze(1))
    cond = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(loss_mask_from_batch({"conditioning_images": cond, "alpha_masks": alpha}, (2, 2)),
                               torch.ones(1, 1, 2, 2))
    assert loss_mask_from_batch({"alpha_masks": None}, (2, 2)) is None


# ---------------------------------------------------------------- pipeline (§8)

def _elem_losses(means):
    """(B,4,2,2) element losses whose per-sample means are ``means``."""
    x = torch.zeros(len(means), 4, 2, 2)
    for i, m in enumerate(means):
        x[i, 0, 0, 0] = 16 * m  # one non-zero element: the mean divides by all 16
    return x


def test_pipeline_order_combination(sched):
    t = torch.tensor(TS)
    means = [0.4, 0.2, 0.8]
    weights = torch.tensor([1.0, 2.0, 0.5])
    cfg = LossConfig(min_snr_gamma=5.0, v_pred_like_loss=0.3, debiased_estimation_loss=True)
    got = reduce_and_weight(_elem_losses(means), t, weights, sched, cfg)
    expected = []
    for ti, m, w in zip(TS, means, weights.tolist()):
        s = ref_snr(ti)
        sc = min(s, 1000)
        L = m * w
        L = L * min(s, 5) / s
        L = L + 0.3 * L / (sc / (sc + 1))
        L = L / math.sqrt(sc)
        expected.append(L)
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-4)


def test_pipeline_v_pred_terms(sched):
    t = torch.tensor(TS)
    means = [1.0, 1.0, 1.0]
    cfg = LossConfig(v_parameterization=True, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True)
    got = reduce_and_weight(_elem_losses(means), t, None, sched, cfg)
    expected = [min(ref_snr(x), 5) / (ref_snr(x) + 1) * min(ref_snr(x), 1000) / (min(ref_snr(x), 1000) + 1) for x in TS]
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-4)


def test_pipeline_uses_original_snr_with_ztsnr(sched):
    z = build_training_schedule(zero_terminal_snr=True, v_parameterization=True)
    cfg = LossConfig(min_snr_gamma=5.0, debiased_estimation_loss=True)
    t = torch.tensor(TS)
    a = reduce_and_weight(_elem_losses([1, 1, 1]), t, None, sched, cfg)
    b = reduce_and_weight(_elem_losses([1, 1, 1]), t, None, z, cfg)
    assert torch.isfinite(b) and a.item() == b.item()


def test_methods_drop_what_upstream_ignores(sched):
    args = argparse.Namespace(v_pred_like_loss=0.5, masked_loss=True, min_snr_gamma=None, loss_type="l2")
    t, elem = torch.tensor([500, 500]), _elem_losses([1.0, 1.0])
    weights, mask = torch.tensor([2.0, 2.0]), torch.zeros(2, 1, 2, 2)
    n, d, f = (loss_config(args, m) for m in ("N", "D", "F"))
    assert n.v_pred_like_loss == 0.5 and d.v_pred_like_loss is None and f.v_pred_like_loss is None
    assert d.masked_loss and not f.masked_loss
    assert reduce_and_weight(elem, t, weights, sched, d, mask).item() == 0.0  # masked out entirely
    assert reduce_and_weight(elem, t, weights, sched, d).item() == pytest.approx(2.0)  # no mask in the batch
    assert reduce_and_weight(elem, t, weights, sched, f, mask).item() == pytest.approx(1.0)  # no mask, no weights
    factor = 1 + 0.5 / (ref_snr(500) / (ref_snr(500) + 1))
    assert reduce_and_weight(elem, t, weights, sched, n).item() == pytest.approx(2.0 * factor, rel=1e-4)


def test_loss_config_validates_choices():
    with pytest.raises(UserError, match="--huber_schedule"):
        LossConfig(huber_schedule="linear")
    with pytest.raises(UserError, match="--loss_type"):
        conditional_loss(torch.zeros(1), torch.zeros(1), "l1")
