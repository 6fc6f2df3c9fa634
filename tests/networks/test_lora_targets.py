"""Which layers get LoRA modules and their names: spec file-formats §a.1 (counts table, examples, pitfalls 1-4, 11).

Tiny-model counts are compared with counts taken here straight from the module tree; real-size counts
with the spec's table, on real-size models built on the meta device.
"""
from __future__ import annotations

import re

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn

import networks.lora as lora

from .helpers import text_encoder_arg

SD1_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8)
SD2_UNET = dict(SD1_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_H23 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280)


def _real_models(family: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel(**{"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}[family])
        if family == "sdxl":
            te = [CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))]
        else:
            te = CLIPTextModel(CLIPTextConfig(**(CLIP_L if family == "sd1" else CLIP_H23)))
    return te, unet


def _kinds(loras) -> tuple[int, int, int]:
    """(Linear, 1x1 conv, k x k conv) counts of LoRA modules by their down layer."""
    lin = sum(isinstance(m.lora_down, nn.Linear) for m in loras)
    one = sum(isinstance(m.lora_down, nn.Conv2d) and m.lora_down.kernel_size == (1, 1) for m in loras)
    return lin, one, len(loras) - lin - one


@pytest.mark.parametrize("family, te_count, lierla, c3lier", [
    ("sd1", 72, 192, (182, 46, 50)),
    ("sd2", 138, 192, (214, 14, 50)),  # Diffusers base: proj_in/out are Linear
    ("sdxl", 264, 722, (739, 11, 38)),
])
def test_real_size_module_counts(family, te_count, lierla, c3lier):
    te, unet = _real_models(family)
    net = lora.create_network(1.0, 4, 1.0, None, te, unet)
    assert (len(net.text_encoder_loras), len(net.unet_loras)) == (te_count, lierla)
    c3 = lora.create_network(1.0, 4, 1.0, None, te, unet, conv_dim="4")
    assert _kinds(c3.unet_loras) == c3lier
    assert len(c3.unet_loras) == sum(c3lier)


def _independent_counts(models) -> tuple[int, int, int]:
    """(TE, LierLa, C3Lier) counted from the module tree by class names, without the network code."""
    te = 0
    for enc in models.text_encoders:
        for name, m in enc.named_modules():
            if isinstance(m, nn.Linear) and re.search(r"layers\.\d+\.(self_attn|mlp)\.", name):
                te += 1

    def inside(classes):
        total = 0
        for _, m in models.unet.named_modules():
            if type(m).__name__ in classes:
                total += sum(isinstance(c, (nn.Linear, nn.Conv2d)) for c in m.modules())
        return total

    transformer = inside({"Transformer2DModel"})
    return te, transformer, transformer + inside({"ResnetBlock2D", "Downsample2D", "Upsample2D"})


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_module_counts_match_module_tree(tiny, family):
    models = tiny(family)
    te, lierla, c3lier = _independent_counts(models)
    net = lora.create_network(1.0, 4, 1.0, None, text_encoder_arg(models), models.unet)
    c3 = lora.create_network(1.0, 4, 1.0, None, text_encoder_arg(models), models.unet, conv_dim="2")
    assert (len(net.text_encoder_loras), len(net.unet_loras), len(c3.unet_loras)) == (te, lierla, c3lier)


def test_conv_targets_do_not_leak_into_later_networks(tiny):
    """Pitfall 4: a C3Lier network must not widen the targets of a LierLa network created afterwards."""
    models = tiny("sd1")
    first = len(lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet).unet_loras)
    lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet, conv_dim="4")
    assert len(lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet).unet_loras) == first


def test_sd1_names_use_diffusers_paths():
    te, unet = _real_models("sd1")
    names = {m.lora_name for m in lora.create_network(1.0, 4, 1.0, None, te, unet, conv_dim="4").unet_loras}
    te_names = {m.lora_name for m in lora.create_network(1.0, 4, 1.0, None, te, unet).text_encoder_loras}
    for expected in ["lora_unet_down_blocks_0_attentions_0_proj_in",
                     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                     "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                     "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k",
                     "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
                     "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_down_blocks_0_downsamplers_0_conv",
                     "lora_unet_up_blocks_0_upsamplers_0_conv"]:
        assert expected in names
    # transformers >= 5.6 CLIPTextModel has no ``text_model.`` in its paths; the names still do (pitfall 11)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te_names


def test_sdxl_names_use_ldm_paths():
    te, unet = _real_models("sdxl")
    net = lora.create_network(1.0, 4, 1.0, None, te, unet, conv_dim="4")
    names = {m.lora_name for m in net.text_encoder_loras + net.unet_loras}
    for expected in ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_4_1_proj_in",
                     "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                     "lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_v",
                     "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
                     "lora_unet_input_blocks_1_0_out_layers_3", "lora_unet_input_blocks_4_0_skip_connection",
                     "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
                     "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
                     "lora_te2_text_model_encoder_layers_31_mlp_fc1"]:
        assert expected in names
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)


def test_tensor_shapes_and_init(tiny):
    """spec §a.2: down (r,in[,k,k]) with the conv's stride/padding, up (out,r[,1,1]), zero up, scalar alpha."""
    models = tiny("sd1")
    net = lora.create_network(1.0, 3, 1.5, None, models.text_encoders[0], models.unet, conv_dim="2", conv_alpha="0.5")
    by_name = {m.lora_name: m for m in net.unet_loras}
    conv = by_name["lora_unet_down_blocks_0_downsamplers_0_conv"]
    org = models.unet.down_blocks[0].downsamplers[0].conv
    assert conv.lora_down.weight.shape == (2, org.in_channels, 3, 3)
    assert (conv.lora_down.stride, conv.lora_down.padding) == (org.stride, org.padding)
    assert conv.lora_up.weight.shape == (org.out_channels, 2, 1, 1)
    assert conv.alpha.item() == 0.5 and conv.scale == 0.25
    proj = by_name["lora_unet_down_blocks_0_attentions_0_proj_in"]  # SD1: 1x1 conv, network dim
    assert proj.lora_down.weight.shape[2:] == (1, 1) and proj.lora_dim == 3
    assert all(int(torch.count_nonzero(m.lora_up.weight)) == 0 for m in net.unet_loras)
    assert all(m.alpha.ndim == 0 and m.alpha.dtype == torch.float32 for m in net.unet_loras)


def test_defaults_dim_4_alpha_1_and_alpha_zero_means_rank(tiny):
    models = tiny("sd1")
    net = lora.create_network(1.0, None, None, None, models.text_encoders[0], models.unet)
    assert {(m.lora_dim, float(m.alpha)) for m in net.text_encoder_loras + net.unet_loras} == {(4, 1.0)}
    zero = lora.create_network(1.0, 8, 0, None, models.text_encoders[0], models.unet)
    assert {(m.scale, float(m.alpha)) for m in zero.unet_loras} == {(1.0, 8.0)}


def test_state_dict_order_te_then_unet_alpha_first(tiny):
    models = tiny("sdxl")
    net = lora.create_network(1.0, 4, 1.0, None, models.text_encoders, models.unet)
    net.apply_to(models.text_encoders, models.unet)
    keys = list(net.state_dict())
    assert keys[:3] == [f"{net.text_encoder_loras[0].lora_name}.{s}" for s in ("alpha", "lora_down.weight",
                                                                               "lora_up.weight")]
    rank = {"te1": 0, "te2": 1, "unet": 2}
    order = [rank[k.split("_")[1]] for k in keys[::3]]
    assert order == sorted(order) and set(order) == {0, 1, 2}  # te1, then te2, then U-Net


@pytest.mark.parametrize("flags, te_empty, unet_empty", [((False, True), True, False), ((True, False), False, True)])
def test_train_one_part_only_drops_the_other(tiny, tmp_path, flags, te_empty, unet_empty):
    from safetensors.torch import load_file

    models = tiny("sd1")
    net = lora.create_network(1.0, 4, 1.0, None, models.text_encoders[0], models.unet)
    net.apply_to(models.text_encoders[0], models.unet, *flags)
    net.save_weights(str(tmp_path / "x.safetensors"), None, {})
    keys = load_file(str(tmp_path / "x.safetensors"))
    assert (not any(k.startswith("lora_te") for k in keys)) == te_empty
    assert (not any(k.startswith("lora_unet") for k in keys)) == unet_empty
    assert keys
