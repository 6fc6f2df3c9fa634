"""LDM files have the real key layout; config inference recovers real-size architectures."""
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from library.models.architectures import infer_unet_config
from library.models.key_rules import model_to_ldm
from library.models.unet_keys import unet_rules

# Real SD1.5 LDM <-> Diffusers name pairs (from the published v1-5 checkpoint and its Diffusers folder).
SD15_PAIRS = {
    "time_embed.0.weight": "time_embedding.linear_1.weight",
    "input_blocks.0.0.weight": "conv_in.weight",
    "input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
    "input_blocks.1.0.emb_layers.1.weight": "down_blocks.0.resnets.0.time_emb_proj.weight",
    "input_blocks.1.1.proj_in.weight": "down_blocks.0.attentions.0.proj_in.weight",
    "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
    "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
    "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
    "input_blocks.11.0.out_layers.3.weight": "down_blocks.3.resnets.1.conv2.weight",
    "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "middle_block.2.in_layers.2.weight": "mid_block.resnets.1.conv1.weight",
    "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
    "output_blocks.8.2.conv.weight": "up_blocks.2.upsamplers.0.conv.weight",
    "output_blocks.3.1.norm.weight": "up_blocks.1.attentions.0.norm.weight",
    "output_blocks.11.1.proj_out.weight": "up_blocks.3.attentions.2.proj_out.weight",
    "output_blocks.0.0.skip_connection.weight": "up_blocks.0.resnets.0.conv_shortcut.weight",
    "out.0.weight": "conv_norm_out.weight",
    "out.2.bias": "conv_out.bias",
}

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
SD21 = dict(SD15, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)


def _meta_unet(cfg):
    with init_empty_weights():
        return UNet2DConditionModel(**cfg)


def test_sd15_real_key_pairs():
    unet = _meta_unet(SD15)
    table = {r.ldm_key: r.model_keys[0] for r in unet_rules(unet.state_dict().keys(), unet.config)}
    for ldm, diff in SD15_PAIRS.items():
        assert table[ldm] == diff


@pytest.mark.parametrize("family,cfg", [("sd1", SD15), ("sd2", SD21), ("sdxl", SDXL)])
def test_real_size_config_inferred_from_ldm_shapes(family, cfg):
    unet = _meta_unet(cfg)
    ldm = model_to_ldm(unet.state_dict(), unet_rules(unet.state_dict().keys(), unet.config))
    inferred = infer_unet_config({k: tuple(v.shape) for k, v in ldm.items()}, family)
    rebuilt = _meta_unet(inferred)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    assert list(inferred["block_out_channels"]) == list(cfg["block_out_channels"])
    assert inferred["cross_attention_dim"] == cfg["cross_attention_dim"]
    assert inferred["use_linear_projection"] == cfg.get("use_linear_projection", False)
    if family == "sdxl":
        assert "model.diffusion_model.label_emb.0.0.weight" not in ldm  # no prefix in this helper
        assert "label_emb.0.0.weight" in ldm and "output_blocks.2.2.conv.weight" in ldm
        assert "middle_block.1.transformer_blocks.9.ff.net.2.weight" in ldm
        assert inferred["transformer_layers_per_block"] == [1, 2, 10]
    if family != "sd1":
        assert inferred["attention_head_dim"] == list(cfg["attention_head_dim"])


def _keys_and_shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_sd1_file_layout(tiny_models):
    s = _keys_and_shapes(tiny_models["sd1"]["safetensors"])
    assert len(s["model.diffusion_model.input_blocks.1.1.proj_in.weight"]) == 4  # SD1: 1x1 conv
    assert len(s["first_stage_model.encoder.mid.attn_1.q.weight"]) == 4  # VAE attention as conv
    # decoder levels are numbered from the bottom: the top-resolution level (up.0) has no upsampler
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in s
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in s
    assert "first_stage_model.decoder.up.0.block.1.conv1.weight" in s  # decoder levels have lpb + 1 blocks
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in s
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in s


def test_sd2_file_layout(tiny_models):
    s = _keys_and_shapes(tiny_models["sd2"]["safetensors"])
    p = "cond_stage_model.model."
    width = s[p + "token_embedding.weight"][1]
    assert s[p + "transformer.resblocks.0.attn.in_proj_weight"] == (3 * width, width)
    assert s[p + "transformer.resblocks.0.attn.in_proj_bias"] == (3 * width,)
    # 3 layers are used; a 4th (SD2's unused last block) is written as the real files have it
    assert p + "transformer.resblocks.3.mlp.c_fc.weight" in s and p + "transformer.resblocks.4.ln_1.weight" not in s
    for k in ("positional_embedding", "ln_final.weight", "text_projection", "logit_scale"):
        assert p + k in s, k
    assert len(s["model.diffusion_model.input_blocks.1.1.proj_in.weight"]) == 2  # SD2: Linear


def test_sdxl_file_layout(tiny_models):
    s = _keys_and_shapes(tiny_models["sdxl"]["safetensors"])
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in s
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in s
    assert s["conditioner.embedders.1.model.text_projection"] == (64, 64)
    assert "conditioner.embedders.1.model.logit_scale" in s
    assert "model.diffusion_model.label_emb.0.0.weight" in s
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in s
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in s


def test_sdxl_text_projection_is_transposed(tiny_models):
    """Pitfall 12: OpenCLIP's matrix is the transpose of HF's text_projection.weight (as diffusers reads it)."""
    from library.models.loading import load_models

    m = load_models(str(tiny_models["sdxl"]["diffusers"]))
    with safe_open(str(tiny_models["sdxl"]["safetensors"]), "pt") as f:
        ldm = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert torch.equal(ldm, m.text_encoders[1].text_projection.weight.t())
