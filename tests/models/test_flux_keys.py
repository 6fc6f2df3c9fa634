"""FLUX.1 transformer keys: our BFL table against diffusers' own converter, configs from shapes."""
import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from library.models.flux_loading import load_flux_transformer

# diffusers' converter splits single blocks with the released widths (3 x 3072 + 12288 rows); a stand-in
# block of those widths lets it run on a tiny file, and the tiny single blocks are checked by hand below
_REAL_SINGLE_ROWS = 3 * 3072 + 4 * 3072


def _stand_in_single_block() -> dict:
    p = "single_blocks.0."
    return {p + "linear1.weight": torch.zeros(_REAL_SINGLE_ROWS, 1), p + "linear1.bias": torch.zeros(_REAL_SINGLE_ROWS),
            p + "modulation.lin.weight": torch.zeros(1), p + "modulation.lin.bias": torch.zeros(1),
            p + "norm.query_norm.scale": torch.zeros(1), p + "norm.key_norm.scale": torch.zeros(1),
            p + "linear2.weight": torch.zeros(1), p + "linear2.bias": torch.zeros(1)}


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_double_blocks_and_embedders_match_diffusers_converter(tiny_flux, name):
    bfl = load_file(str(tiny_flux[name]["transformer"]))
    ours = load_flux_transformer(str(tiny_flux[name]["transformer"])).state_dict()
    checkpoint = {k: v for k, v in bfl.items() if not k.startswith("single_blocks.")}
    theirs = convert_flux_transformer_checkpoint_to_diffusers({**checkpoint, **_stand_in_single_block()})
    theirs = {k: v for k, v in theirs.items() if not k.startswith("single_transformer_blocks.")}
    assert ("time_text_embed.guidance_embedder.linear_1.weight" in theirs) == (name == "dev")
    assert set(theirs) == {k for k in ours if not k.startswith("single_transformer_blocks.")}
    bad = [k for k in theirs if not torch.equal(theirs[k], ours[k])]
    assert not bad, bad[:3]


def test_single_blocks_follow_bfl_linear1_layout(tiny_flux):
    """BFL's single-stream block: linear1 output = [q | k | v | mlp] rows, linear2 is the output projection."""
    bfl = load_file(str(tiny_flux["dev"]["transformer"]))
    model = load_flux_transformer(str(tiny_flux["dev"]["transformer"]))
    h = model.config.num_attention_heads * model.config.attention_head_dim
    sd = model.state_dict()
    for i in range(model.config.num_single_layers):
        for param in ("weight", "bias"):
            packed = bfl[f"single_blocks.{i}.linear1.{param}"]
            d = f"single_transformer_blocks.{i}."
            assert torch.equal(sd[d + f"attn.to_q.{param}"], packed[:h])
            assert torch.equal(sd[d + f"attn.to_k.{param}"], packed[h:2 * h])
            assert torch.equal(sd[d + f"attn.to_v.{param}"], packed[2 * h:3 * h])
            assert torch.equal(sd[d + f"proj_mlp.{param}"], packed[3 * h:])
            assert torch.equal(sd[d + f"proj_out.{param}"], bfl[f"single_blocks.{i}.linear2.{param}"])
            assert torch.equal(sd[d + f"norm.linear.{param}"], bfl[f"single_blocks.{i}.modulation.lin.{param}"])
        assert torch.equal(sd[d + "attn.norm_q.weight"], bfl[f"single_blocks.{i}.norm.query_norm.scale"])
        assert torch.equal(sd[d + "attn.norm_k.weight"], bfl[f"single_blocks.{i}.norm.key_norm.scale"])


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_config_from_shapes_equals_the_written_config(tiny_flux, name):
    """Sizes, depths and dev/schnell come from the tensors alone; the oracle is the config diffusers saved."""
    saved = json.loads((tiny_flux[name]["diffusers"] / "transformer" / "config.json").read_text())
    cfg = load_flux_transformer(str(tiny_flux[name]["transformer"])).config
    for key in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim", "guidance_embeds"):
        assert cfg[key] == saved[key], key
    assert list(cfg["axes_dims_rope"]) == list(saved["axes_dims_rope"])
    assert saved["guidance_embeds"] == (name == "dev")


def test_comfy_prefix_loads_the_same(tiny_flux, tmp_path):
    """Files saved with ``model.diffusion_model.`` in front of every key (ComfyUI) load the same weights."""
    bfl = load_file(str(tiny_flux["schnell"]["transformer"]))
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in bfl.items()}, str(prefixed))
    a = load_flux_transformer(str(prefixed)).state_dict()
    b = load_flux_transformer(str(tiny_flux["schnell"]["transformer"])).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_load_casts_every_tensor(tiny_flux):
    bfl = load_file(str(tiny_flux["dev"]["transformer"]))
    model = load_flux_transformer(str(tiny_flux["dev"]["transformer"]), dtype=torch.bfloat16)
    sd = model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert torch.equal(sd["x_embedder.weight"], bfl["img_in.weight"].to(torch.bfloat16))
