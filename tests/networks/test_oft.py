"""networks.oft against the formulas written out here: the Cayley transform of skew-symmetric blocks, the norm
constraint, the multiplier blend, the merge, and upstream's layer names (sd-scripts v0.8.7 networks/oft.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import networks.oft as oft
from library.errors import UserError

from .helpers import unet_inputs


def _rotation_by_hand(blocks: torch.Tensor, alpha: float, out_dim: int, m: float) -> torch.Tensor:
    """blockdiag over b of m·(I+Q_b)(I-Q_b)^-1 + (1-m)·I, Q = B - Bᵀ scaled to ‖Q‖_F <= alpha·out_dim."""
    q = blocks - blocks.transpose(1, 2)
    norm = q.flatten().norm()
    limit = alpha * out_dim
    if norm > limit:
        q = q * (limit / norm)
    eye = torch.eye(blocks.shape[1])
    rs = [m * ((eye + qb) @ torch.inverse(eye - qb)) + (1 - m) * eye for qb in q]
    return torch.block_diag(*rs)


def _module(org: nn.Module, dim: int, alpha: float, m: float = 1.0, seed: int = 0, std: float = 0.3):
    module = oft.OFTModule("oft_unet_x", org, multiplier=m, dim=dim, alpha=alpha)
    with torch.no_grad():
        module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=torch.Generator().manual_seed(seed))
                                * std)
    module.apply_to()
    return module


@pytest.mark.parametrize("m", [1.0, 0.6])
def test_linear_output_is_rotated_by_the_cayley_blocks(m):
    org = nn.Linear(8, 6)
    module = _module(org, dim=2, alpha=1.0, m=m)
    x = torch.randn(3, 5, 8)
    r = _rotation_by_hand(module.oft_blocks.detach(), 1.0, 6, m)
    expected = F.linear(x, org.weight, org.bias) @ r
    torch.testing.assert_close(org(x), expected, rtol=1e-5, atol=1e-6)
    if m == 1.0:  # an orthogonal map: lengths of the output vectors are kept
        torch.testing.assert_close(r @ r.T, torch.eye(6), rtol=0, atol=1e-5)


def test_the_constraint_caps_the_norm_of_q():
    org = nn.Linear(4, 4, bias=False)
    module = _module(org, dim=1, alpha=0.01, std=5.0)  # ‖Q‖ far above 0.01 · 4
    x = torch.randn(2, 4)
    r = _rotation_by_hand(module.oft_blocks.detach(), 0.01, 4, 1.0)
    torch.testing.assert_close(org(x), x @ org.weight.T @ r, rtol=1e-5, atol=1e-6)
    assert (r - torch.eye(4)).abs().max() < 0.1  # a small rotation: the cap acted


def test_conv_output_channels_are_rotated():
    org = nn.Conv2d(3, 6, 3, padding=1)
    module = _module(org, dim=3, alpha=1.0)
    x = torch.randn(2, 3, 5, 5)
    r = _rotation_by_hand(module.oft_blocks.detach(), 1.0, 6, 1.0)
    expected = torch.einsum("bohw,op->bphw", F.conv2d(x, org.weight, org.bias, padding=1), r)
    torch.testing.assert_close(org(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Linear(8, 6), nn.Conv2d(3, 6, 3, padding=1)])
def test_merge_equals_the_forward_pass_bias_included(layer):
    module = _module(layer, dim=2, alpha=1.0, m=0.8)
    x = torch.randn(2, 8) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 5, 5)
    hooked = layer(x)
    module.merge_into_layer()
    module.enabled = False
    torch.testing.assert_close(layer(x), hooked, rtol=1e-5, atol=1e-5)


def test_blocks_must_divide_the_output_width():
    with pytest.raises(UserError, match="--network_dim 4.*divide 6"):
        oft.OFTModule("oft_unet_x", nn.Linear(3, 6), dim=4)


def _attention_names(unet) -> set[str]:
    """Upstream's attention-only names, written out: every transformer block's attn1/attn2 q, k, v, out.0."""
    names = set()
    for path, module in unet.named_modules():
        if type(module).__name__ == "BasicTransformerBlock":
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    names.add(f"oft_unet_{path}.{attn}.{proj}".replace(".", "_"))
    return names


def test_network_names_shapes_and_file_round_trip(tiny, tmp_path):
    models = tiny("sd1")
    net = oft.create_network(1.0, 4, 2.0, None, models.text_encoders[0], models.unet)
    assert {m.oft_name for m in net.unet_ofts} == _attention_names(models.unet)
    assert net.text_encoder_loras == []  # OFT adapts no text encoder
    sd = net.state_dict()
    for m in net.unet_ofts:
        out = m.org_module.weight.shape[0]
        assert sd[f"{m.oft_name}.oft_blocks"].shape == (4, out // 4, out // 4)
        assert float(sd[f"{m.oft_name}.alpha"]) == 2.0
    assert list(sd)[:2] == [f"{net.unet_ofts[0].oft_name}.oft_blocks", f"{net.unet_ofts[0].oft_name}.alpha"]

    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "oft.safetensors"
    net.save_weights(str(path), None, {})
    fresh = tiny("sd1")
    back, weights = oft.create_network_from_weights(1.0, str(path), None, fresh.text_encoders[0], fresh.unet)
    back.apply_to(None, fresh.unet)
    back.load_state_dict(weights)
    net.apply_to(None, models.unet)
    args, kwargs = unet_inputs(models)
    torch.testing.assert_close(fresh.unet(*args, **kwargs).sample, models.unet(*args, **kwargs).sample)


def test_flags_widen_the_targets(tiny):
    models = tiny("sd1")
    attn = oft.create_network(1.0, 2, 1.0, None, None, models.unet)
    linear = oft.create_network(1.0, 2, 1.0, None, None, models.unet, enable_all_linear="true")
    conv = oft.create_network(1.0, 2, 1.0, None, None, models.unet, enable_all_linear="true", enable_conv="true")
    off = oft.create_network(1.0, 2, 1.0, None, None, models.unet, enable_conv="false")
    a, b, c = ({m.oft_name for m in n.unet_ofts} for n in (attn, linear, conv))
    assert a < b < c and {m.oft_name for m in off.unet_ofts} == a  # "false" means false (upstream: true)
    assert any(n.endswith("_ff_net_2") for n in b - a) and any(n.endswith("_proj_in") for n in b - a)
    assert any("_resnets_0_conv1" in n for n in c) and any("_resnets_0_time_emb_proj" in n for n in c)


def test_file_with_conv_layers_loads_them_back(tiny, tmp_path):
    models = tiny("sd1")
    net = oft.create_network(1.0, 2, 1.0, None, None, models.unet, enable_conv="true")
    path = tmp_path / "oft.safetensors"
    net.save_weights(str(path), None, {})
    back, _ = oft.create_network_from_weights(1.0, str(path), None, None, tiny("sd1").unet)
    assert {m.oft_name for m in back.unet_ofts} == {m.oft_name for m in net.unet_ofts}


@pytest.mark.parametrize("kwargs, message", [({"enable_conv": "maybe"}, "enable_conv='maybe'"),
                                             ({"conv_dim": "4"}, "conv_dim: not an option of networks.oft"),
                                             ({"neuron_dropout": 0.1}, "--network_dropout")])
def test_bad_options_are_named(tiny, kwargs, message):
    models = tiny("sd1")
    with pytest.raises(UserError, match=message):
        oft.create_network(1.0, 2, 1.0, None, None, models.unet, **kwargs)


def test_sdxl_names_use_ldm_paths(tiny):
    models = tiny("sdxl")
    net = oft.create_network(1.0, 2, 1.0, None, models.text_encoders, models.unet)
    names = [m.oft_name for m in net.unet_ofts]
    assert names and all(n.startswith(("oft_unet_input_blocks_", "oft_unet_middle_block_",
                                       "oft_unet_output_blocks_")) for n in names)
    assert all(n.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0")) for n in names)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_lora_merges_an_oft_file_into_the_checkpoint(tmp_path, family):
    """merge_lora.py --sd_model with an OFT file = the OFT applied at run time with the ratio as multiplier."""
    from library.models.loading import load_models
    from networks import merge_lora, sdxl_merge_lora
    from tools.make_tiny_model import write_tiny_model

    base = write_tiny_model(family, tmp_path, formats=("safetensors",))["safetensors"]
    models = load_models(str(base), sdxl=family == "sdxl")
    net = oft.create_network(1.0, 2, 1.0, None, None, models.unet, enable_all_linear="true")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "oft.safetensors"
    net.save_weights(str(path), None, {})
    out = tmp_path / "merged.safetensors"
    main = sdxl_merge_lora.main if family == "sdxl" else merge_lora.main
    main(["--sd_model", str(base), "--models", str(path), "--ratios", "0.7", "--save_to", str(out)])

    net.set_multiplier(0.7)
    net.apply_to(None, models.unet)
    args, kwargs = unet_inputs(models)
    expected = models.unet(*args, **kwargs).sample
    merged = load_models(str(out), sdxl=family == "sdxl")
    torch.testing.assert_close(merged.unet(*args, **kwargs).sample, expected, atol=1e-4, rtol=1e-4)  # fp32 sums

    with pytest.raises(SystemExit) as e:  # OFT + OFT into one file: rotations do not add
        main(["--models", str(path), "--ratios", "1", "--save_to", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2
