"""Block indices, block-wise dims and LR weights (spec cli-options §12, file-formats pitfall 2)."""
from __future__ import annotations

import math

import pytest

import networks.lora as lora
from library.errors import UserError
from networks.lora_blocks import preset_weights
from networks.lora_targets import block_index


@pytest.mark.parametrize("name, index", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 1),
    ("lora_unet_down_blocks_0_resnets_1_conv1", 2),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),
    ("lora_unet_down_blocks_3_resnets_1_conv2", 11),
    ("lora_unet_mid_block_attentions_0_proj_out", 12),
    ("lora_unet_up_blocks_0_resnets_0_conv1", 13),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", 15),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", 24),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", -1),
    ("lora_unet_input_blocks_4_1_proj_in", -1),  # SDXL names have no block index
    ("lora_unet_middle_block_1_proj_in", -1),
])
def test_block_index(name, index):
    assert block_index(name) == index


def test_presets_with_base():
    n = 12
    assert preset_weights("linear") == pytest.approx([i / (n - 1) for i in range(n)])
    assert preset_weights("reverse_linear") == pytest.approx([i / (n - 1) for i in reversed(range(n))])
    assert preset_weights("sine") == pytest.approx([math.sin(math.pi * i / (n - 1) / 2) for i in range(n)])
    assert preset_weights("cosine") == pytest.approx([math.sin(math.pi * i / (n - 1) / 2) for i in reversed(range(n))])
    assert preset_weights("zeros+0.5") == [0.5] * n
    with pytest.raises(UserError, match="unknown preset"):
        preset_weights("triangle")


def test_block_dims_assign_ranks_per_block(tiny):
    models = tiny("sd1")
    dims = ",".join(str(2 + i % 3) for i in range(25))
    alphas = ",".join(str(float(i)) for i in range(25))
    net = lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet, block_dims=dims,
                              block_alphas=alphas)
    for m in net.unet_loras:
        idx = block_index(m.lora_name)
        assert m.lora_dim == 2 + idx % 3 and float(m.alpha) == (float(idx) or m.lora_dim)
    assert {m.lora_dim for m in net.text_encoder_loras} == {4}  # text encoder keeps network_dim


def test_sdxl_block_dims_use_last_entry(tiny):
    models = tiny("sdxl")
    dims = ",".join(["2"] * 24 + ["7"])
    net = lora.create_network(1.0, 4, 1.0, None, models.text_encoders, models.unet, block_dims=dims)
    assert {m.lora_dim for m in net.unet_loras} == {7}  # every SDXL module has index -1 (pitfall 2)


def test_bad_block_dims_length_is_user_error(tiny):
    models = tiny("sd1")
    with pytest.raises(UserError, match="block_dims must have 25"):
        lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet, block_dims="1,2")


def test_lr_weights_groups_and_zero_blocks(tiny):
    models = tiny("sd1")
    net = lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet, conv_dim="2",
                              down_lr_weight="linear", mid_lr_weight="2.0", up_lr_weight="0,0,0,1,1,1,1,1,1,1,1,0.5",
                              block_lr_zero_threshold="0.1")
    indices = {block_index(m.lora_name) for m in net.unet_loras}
    weights = [i / 11 for i in range(12)]
    # down weight at index 1 is 1/11 <= 0.1 -> no modules there; up blocks 13..15 get weight 0 -> none
    assert 1 not in indices and not indices & {13, 14, 15} and {2, 12, 16, 24} <= indices
    groups = net.prepare_optimizer_params(1e-5, 1e-3, 1e-4)
    assert groups[0]["lr"] == 1e-5 and len(groups[0]["params"]) == 2 * len(net.text_encoder_loras)
    lrs = sorted(g["lr"] for g in groups[1:])
    expected = sorted([1e-3 * weights[i] for i in indices if 0 < i < 12]
                      + [2e-3] + [1e-3 * (0.5 if i == 24 else 1.0) for i in indices if i > 12])
    assert lrs == pytest.approx(expected)
    assert sum(len(g["params"]) for g in groups[1:]) == 2 * len(net.unet_loras)


def test_plain_param_groups_and_two_arg_form(tiny):
    models = tiny("sd1")
    net = lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet)
    groups = net.prepare_optimizer_params(None, 1e-3)
    assert "lr" not in groups[0] and groups[1]["lr"] == 1e-3 and len(groups) == 2
