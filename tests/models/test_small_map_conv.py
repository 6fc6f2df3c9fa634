"""Wide convolutions over small maps as unfold + linear (library/models/small_map_conv.py): the oracle is
``F.conv2d`` itself, exact in float64 and within float32 rounding on a U-Net wide enough to take the path."""
import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from library.models import small_map_conv as smc


@pytest.mark.parametrize("shape,kernel,stride,padding,bias", [
    ((1, 5, 8, 8), 3, 1, 1, True), ((2, 5, 7, 6), 3, 2, 1, True), ((1, 5, 4, 4), 3, 1, 0, False),
    ((3, 5, 2, 2), 3, 1, 1, True), ((1, 5, 1, 1), 3, 1, 1, True), ((1, 5, 6, 5), (3, 2), (2, 1), (1, 0), True)])
def test_matrix_conv_is_conv2d_with_its_gradients(shape, kernel, stride, padding, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, kernel, stride, padding, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    got = smc.matrix_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_rule_takes_only_wide_plain_float32_layers_on_small_maps():
    wide = torch.nn.Conv2d(384, 384, 3, padding=1)  # 1.3 M weights
    small_map, large_map = torch.randn(1, 384, 8, 8), torch.randn(1, 384, 16, 16)
    assert smc.takes_matrix_path(wide, small_map, wide.weight)
    assert not smc.takes_matrix_path(wide, large_map, wide.weight)
    assert not smc.takes_matrix_path(wide, small_map.double(), wide.weight.double())
    assert not smc.takes_matrix_path(wide, small_map.bfloat16(), wide.weight.bfloat16())
    narrow = torch.nn.Conv2d(320, 320, 3, padding=1)  # SD's first level: 0.9 M weights
    assert not smc.takes_matrix_path(narrow, torch.randn(1, 320, 8, 8), narrow.weight)
    for other in (torch.nn.Conv2d(384, 384, 3, padding=1, groups=2), torch.nn.Conv2d(384, 384, 3, dilation=2),
                  torch.nn.Conv2d(384, 384, 3, padding=1, padding_mode="reflect"),
                  torch.nn.Conv2d(384, 384, 3, padding="same"), torch.nn.Conv2d(1536, 1024, 1)):
        assert not smc.takes_matrix_path(other, torch.randn(1, other.in_channels, 8, 8), other.weight), other


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)  # the second level is 384 wide: its 3x3 layers take the matrix path at 4x4
    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 384), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=32).eval().requires_grad_(False)


def _forward_backward(unet):
    torch.manual_seed(1)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    context = torch.randn(1, 5, 16, requires_grad=True)
    out = unet(x, torch.tensor([500]), context).sample
    return [out.detach(), *torch.autograd.grad(out, (x, context), torch.ones_like(out))]


def test_unet_with_matrix_convs_matches_plain_within_rounding(monkeypatch):
    plain = _unet()
    patched = copy.deepcopy(plain)
    assert smc.use_matrix_convs(patched) > 0
    taken = []
    real = smc.matrix_conv2d
    monkeypatch.setattr(smc, "matrix_conv2d", lambda *a: taken.append(a[1].shape) or real(*a))
    want, got = _forward_backward(plain), _forward_backward(patched)
    assert taken and all(s.numel() >= smc.MIN_WEIGHT for s in taken)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert patched.state_dict().keys() == plain.state_dict().keys()
    # a copy (EMA's shadow, a saved sample model) computes through its own weights
    twin = copy.deepcopy(patched)
    with torch.no_grad():
        twin.conv_out.weight.zero_()
        twin.conv_out.bias.zero_()
    assert torch.count_nonzero(_forward_backward(twin)[0]) == 0 and torch.count_nonzero(_forward_backward(patched)[0])


def test_opt_out_keeps_conv2d(monkeypatch):
    monkeypatch.setenv(smc.OPT_OUT, "1")
    plain, kept = _unet(), _unet()
    assert smc.use_matrix_convs(kept) == 0
    assert all(torch.equal(a, b) for a, b in zip(_forward_backward(kept), _forward_backward(plain)))
