"""LoRA forward, merge, dropouts and max-norm against formulas written out here (spec file-formats §a.2,
cli-options §13)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import networks.lora as lora
from networks.lora_modules import LoRAModule

from .helpers import randomize_up, text_encoder_arg, token_ids, unet_inputs


def _module(org: nn.Module, dim=3, alpha=1.5, **kw) -> LoRAModule:
    torch.manual_seed(0)
    m = LoRAModule("lora_unet_x", org, multiplier=0.7, lora_dim=dim, alpha=alpha, **kw)
    with torch.no_grad():
        m.lora_up.weight.normal_()
    m.apply_to()
    return m


def test_linear_forward_formula():
    org = nn.Linear(6, 5)
    m = _module(org)
    x = torch.randn(2, 4, 6)
    w0 = F.linear(x, org.weight, org.bias)
    expected = w0 + (x @ m.lora_down.weight.T @ m.lora_up.weight.T) * 0.7 * (1.5 / 3)
    torch.testing.assert_close(org(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel, stride, padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_conv_forward_formula(kernel, stride, padding):
    org = nn.Conv2d(4, 6, kernel, stride, padding)
    m = _module(org)
    x = torch.randn(2, 4, 9, 9)
    down = F.conv2d(x, m.lora_down.weight, stride=stride, padding=padding)
    expected = F.conv2d(x, org.weight, org.bias, stride, padding) + F.conv2d(down, m.lora_up.weight) * 0.7 * 0.5
    torch.testing.assert_close(org(x), expected, rtol=0, atol=1e-5)


def test_module_dropout_returns_base_output():
    org = nn.Linear(6, 5)
    m = _module(org, module_dropout=1.0)  # p=1: always dropped
    x = torch.randn(3, 6)
    base = F.linear(x, org.weight, org.bias)
    m.train()
    torch.testing.assert_close(org(x), base, rtol=0, atol=0)
    m.eval()  # dropouts act only in training mode
    assert not torch.allclose(org(x), base)


def test_rank_dropout_mask_shape_and_scale(monkeypatch):
    org = nn.Linear(6, 5, bias=False)
    p = 0.25
    m = _module(org, dim=4, alpha=4.0, rank_dropout=p)
    drawn = []
    real_rand = torch.rand

    def fake_rand(*shape, **kw):
        out = real_rand(*shape, **kw)
        drawn.append(out)
        return out

    monkeypatch.setattr(torch, "rand", fake_rand)
    m.train()
    x = torch.randn(2, 7, 6)
    y = org(x)
    (mask_source,) = [t for t in drawn if t.shape == (2, 4)]  # one (B, r) draw, shared by all tokens
    mask = (mask_source > p).float()[:, None, :]
    expected = F.linear(x, org.weight) + ((x @ m.lora_down.weight.T) * mask) @ m.lora_up.weight.T * 0.7 / (1 - p)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


def test_rank_dropout_conv_masks_whole_channels():
    org = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    m = _module(org, dim=8, alpha=8.0, rank_dropout=0.5)
    m.train()
    torch.manual_seed(3)
    lx = m.lora_down(torch.randn(2, 3, 5, 5))
    seen = []
    m.lora_up.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    org(torch.randn(2, 3, 5, 5))
    zero_channels = (seen[0] == 0).all(dim=(2, 3))  # (B, r): a channel is dropped everywhere or nowhere
    partly = ((seen[0] == 0).any(dim=(2, 3)) & ~zero_channels)
    assert zero_channels.any() and not partly.any() and lx.shape[1] == 8


def test_neuron_dropout_statistics():
    org = nn.Linear(64, 64, bias=False)
    m = _module(org, dim=64, alpha=64.0, dropout=0.5)
    seen = []
    m.lora_up.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    m.train()
    org(torch.randn(16, 64))
    zero_fraction = float((seen[0] == 0).float().mean())
    assert 0.4 < zero_fraction < 0.6


def _outputs(models, network_multiplier=None, net=None, dtype=torch.float32):
    if net is not None and network_multiplier is not None:
        net.set_multiplier(network_multiplier)
    args, kwargs = unet_inputs(models)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        te = [enc(token_ids()).last_hidden_state for enc in models.text_encoders]
        return te, models.unet(*args, **kwargs).sample


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_equals_applied_network(tiny, family):
    applied = tiny(family)
    net = lora.create_network(0.8, 4, 2.0, None, text_encoder_arg(applied), applied.unet, conv_dim="3",
                              conv_alpha="1.5")
    randomize_up(net)
    net.apply_to(text_encoder_arg(applied), applied.unet)
    te_applied, unet_applied = _outputs(applied)
    base_te, base_unet = _outputs(applied, 0.0, net)
    assert (unet_applied - base_unet).abs().max() > 1e-3  # the network really changes the output

    merged = tiny(family)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    target, _ = lora.create_network_from_weights(0.8, None, None, text_encoder_arg(merged), merged.unet, weights)
    target.merge_to(text_encoder_arg(merged), merged.unet, weights, torch.float32, "cpu")
    te_merged, unet_merged = _outputs(merged)
    torch.testing.assert_close(unet_merged, unet_applied, rtol=0, atol=1e-5)
    for a, b in zip(te_merged, te_applied):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_pre_calculation_and_restore(tiny):
    # float64: a large LoRA effect on a random tiny U-Net amplifies fp32 rounding beyond 1e-5
    models = tiny("sd1")
    models.unet.double()
    net = lora.create_network(1.0, 4, 4.0, None, models.text_encoders[0], models.unet, conv_dim="2")
    randomize_up(net)
    net.double()
    net.apply_to(models.text_encoders[0], models.unet)
    _, applied = _outputs(models, dtype=torch.float64)
    net.backup_weights()
    net.pre_calculation()
    _, merged = _outputs(models, dtype=torch.float64)
    torch.testing.assert_close(merged, applied, rtol=0, atol=1e-10)
    net.restore_weights()
    _, restored = _outputs(models, dtype=torch.float64)
    torch.testing.assert_close(restored, applied, rtol=0, atol=1e-12)  # weights back, module on again


def test_max_norm_regularization_formula(tiny):
    models = tiny("sd1")
    net = lora.create_network(1.0, 4, 2.0, None, models.text_encoders[0], models.unet, conv_dim="2")
    randomize_up(net, std=1.0)
    loras = net.text_encoder_loras + net.unet_loras
    max_norm = 1.0

    def norm_of(m):  # W = up·down·alpha/dim, convs composed (written out per layout)
        up, down = m.lora_up.weight.detach(), m.lora_down.weight.detach()
        if down.ndim == 2:
            w = up @ down
        elif down.shape[2:] == (1, 1):
            w = up[:, :, 0, 0] @ down[:, :, 0, 0]
        else:
            w = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        return float((w * float(m.alpha) / down.shape[0]).norm())

    before = [norm_of(m) for m in loras]
    ups = [m.lora_up.weight.detach().clone() for m in loras]
    scaled, mean, biggest = net.apply_max_norm_regularization(max_norm, "cpu")
    after = [norm_of(m) for m in loras]
    expected = [min(max(n, max_norm / 2), max_norm) / max(n, max_norm / 2) for n in before]
    assert scaled == sum(r != 1 for r in expected) and scaled > 0
    for m, up, r in zip(loras, ups, expected):
        torch.testing.assert_close(m.lora_up.weight.detach(), up * math.sqrt(r), rtol=1e-5, atol=1e-7)
    assert max(after) <= max_norm * (1 + 1e-5)
    assert mean == pytest.approx(sum(after) / len(after), rel=1e-4) and biggest == pytest.approx(max(after), rel=1e-4)


def test_loaded_alpha_updates_scale(tiny):
    models = tiny("sd1")
    net = lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet)
    net.apply_to(models.text_encoders[0], models.unet)
    sd = net.state_dict()
    sd = {k: (torch.tensor(2.0) if k.endswith("alpha") else v) for k, v in sd.items()}
    net.load_state_dict(sd, strict=False)
    assert {m.scale for m in net.unet_loras} == {0.5}
