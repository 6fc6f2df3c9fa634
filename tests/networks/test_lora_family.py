"""networks/lora_family.py: a LoRA's / embedding's model family from its key names, shapes and metadata.

Oracles: the key names and widths of spec file-formats §a.1 (SDXL LDM paths and ``lora_te1/2``, SD1/SD2
Diffusers paths and ``lora_te``; CLIP-L 768 / OpenCLIP-H 1024 wide with 12 / 23 layers), the metadata keys
of §b.1/§b.3, and files written by the project's own ``networks.lora`` on tiny models of a known family.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from networks.lora_family import (SD1, SD1_OR_SD2, SD2, SDXL, check_file_for_family, check_fits_layers,
                                  check_lora_matches, embedding_family, family_of, lora_file_family,
                                  model_family_of, read_tensor_file)
from networks.lora_targets import target_weight_shapes

from .helpers import write_lora


def _lora(tmp_path, modules: dict[str, tuple[int, int]], metadata=None, name="x.safetensors") -> str:
    """A hand-written LoRA: ``{module: (in, out)}`` -> rank-2 Linear factors."""
    sd = {}
    for module, (n_in, n_out) in modules.items():
        sd[f"{module}.lora_down.weight"] = torch.zeros(2, n_in)
        sd[f"{module}.lora_up.weight"] = torch.zeros(n_out, 2)
        sd[f"{module}.alpha"] = torch.tensor(1.0)
    path = tmp_path / name
    save_file(sd, str(path), metadata)
    return str(path)


Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize("modules, metadata, family", [
    ({Q: (768, 768)}, None, SD1),                              # CLIP ViT-L width
    ({Q: (1024, 1024)}, None, SD2),                            # OpenCLIP ViT-H width
    ({Q: (1024, 1024)}, {"ss_base_model_version": "sd_v1"}, SD2),  # the shapes outrank a wrong label
    ({K2: (1024, 320)}, None, SD2),                            # U-Net cross-attention reads the TE width
    ({K2: (768, 320)}, None, SD1),
    ({"lora_te_text_model_encoder_layers_22_mlp_fc1": (32, 64)}, None, SD2),  # 23 OpenCLIP layers
    ({Q: (32, 32)}, None, SD1_OR_SD2),                         # tiny widths, no label: undecided
    ({Q: (32, 32)}, {"ss_base_model_version": "sd_v2_v"}, SD2),
    ({Q: (32, 32)}, {"ss_v2": "True"}, SD2),
    ({Q: (32, 32)}, {"ss_v2": "False"}, SD1),
    ({Q: (32, 32)}, {"modelspec.architecture": "stable-diffusion-v2-512/lora"}, SD2),
    ({Q: (32, 32)}, {"modelspec.architecture": "stable-diffusion-v1/lora"}, SD1),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": (768, 3072)}, {"ss_v2": "True"}, SDXL),
    ({"lora_te2_text_model_encoder_layers_31_mlp_fc2": (5120, 1280)}, None, SDXL),
    ({"lora_unet_input_blocks_4_1_proj_in": (640, 640)}, None, SDXL),
    ({"lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": (5120, 1280)}, None, SDXL),
    ({"lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_v": (2048, 1280)}, None, SDXL),
    ({"lora_unet_mid_block_attentions_0_proj_in": (1280, 1280)}, {"ss_base_model_version": "sdxl_base_v1-0"},
     SD1_OR_SD2),  # Diffusers U-Net paths are never SDXL kohya names: the label does not override them
])
def test_family_from_names_shapes_metadata(tmp_path, modules, metadata, family):
    assert lora_file_family(_lora(tmp_path, modules, metadata)) == family


def test_mixed_and_unknown_names(tmp_path):
    mixed = _lora(tmp_path, {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (8, 8), K2: (8, 8)}, name="m.safetensors")
    with pytest.raises(UserError, match="mixes SDXL module names .*lora_te1_.* with SD1/SD2 ones .*down_blocks"):
        lora_file_family(mixed)
    other = _lora(tmp_path, {"oft_unet_x": (8, 8)}, name="o.safetensors")
    with pytest.raises(UserError, match="not a kohya LoRA file"):
        lora_file_family(other)
    assert family_of(read_tensor_file(other), require_known=False) is None
    assert check_file_for_family(other, SD1) is None  # a plug-in's own names: its network checks them
    with pytest.raises(UserError, match="is an SD1/SD2 LoRA but the model is SDXL"):
        check_file_for_family(_lora(tmp_path, {Q: (8, 8)}, name="q.safetensors"), SDXL)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_project_lora_files_and_models(tiny, tmp_path, family):
    """Files our networks.lora writes for a tiny model are recognised, with and without a label."""
    models = tiny(family)
    labels = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
    labelled = write_lora(models, tmp_path / "l.safetensors", metadata={"ss_base_model_version": labels[family]})
    bare = write_lora(models, tmp_path / "b.safetensors", metadata={"ss_network_dim": "4"})
    assert lora_file_family(labelled) == family
    assert lora_file_family(bare) == (SDXL if family == "sdxl" else SD1_OR_SD2)
    te = models.text_encoders if family == "sdxl" else models.text_encoders[0]
    assert model_family_of(te, models.unet) == family
    assert check_lora_matches(labelled, family) == family


def test_pickle_lora_reads_like_safetensors(tiny, tmp_path):
    models = tiny("sdxl")
    path = write_lora(models, tmp_path / "x.safetensors")
    from safetensors.torch import load_file

    torch.save(load_file(path), tmp_path / "x.pt")
    assert read_tensor_file(tmp_path / "x.pt").shapes == read_tensor_file(path).shapes
    assert lora_file_family(tmp_path / "x.pt") == SDXL


def test_partial_match_is_fine_and_shapes_are_checked(tiny, tmp_path):
    """A LoRA without text-encoder modules fits (count = its U-Net modules); a wrong width names both shapes."""
    from safetensors.torch import load_file

    models = tiny("sd1")
    full = load_file(write_lora(models, tmp_path / "a.safetensors"))
    unet_only = {k: v for k, v in full.items() if k.startswith("lora_unet_")}
    save_file(unet_only, str(tmp_path / "u.safetensors"))
    shapes = target_weight_shapes(models.text_encoders[0], models.unet)
    tf = read_tensor_file(tmp_path / "u.safetensors")
    assert check_fits_layers(tf, shapes, SD1) == len({k.split(".")[0] for k in unet_only})
    name = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    unet_only[f"{name}.lora_down.weight"] = torch.zeros(4, 48)
    save_file(unet_only, str(tmp_path / "w.safetensors"))
    want = tuple(models.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k").weight.shape)
    with pytest.raises(UserError) as e:
        check_fits_layers(read_tensor_file(tmp_path / "w.safetensors"), shapes, SD1)
    assert f"tensor {name}.lora_down.weight has shape (4, 48)" in str(e.value)
    assert f"layer weight is ({want[0]}, {want[1]})" in str(e.value)


@pytest.mark.parametrize("tensors, family", [
    ({"clip_l": (2, 768), "clip_g": (2, 1280)}, SDXL),
    ({"emb_params": (3, 768)}, SD1),
    ({"emb_params": (3, 1024)}, SD2),
    ({"emb_params": (3, 32)}, SD1_OR_SD2),
])
def test_embedding_family(tmp_path, tensors, family):
    path = tmp_path / "e.safetensors"
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    assert embedding_family(read_tensor_file(path)) == family


def test_a1111_embedding_pickle(tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(2, 1024)}, "name": "x"}, tmp_path / "a.pt")
    assert embedding_family(read_tensor_file(tmp_path / "a.pt")) == SD2


@pytest.mark.parametrize("content, needle", [
    (b"", "shorter than a header"),
    (b"hello world, a text file\n" * 4, "not a .safetensors file, or truncated"),
    ((11).to_bytes(8, "little") + b"not json :-", "header is not JSON"),
])
def test_unreadable_files_name_the_file(tmp_path, content, needle):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_tensor_file(path, "--network_weights")
    assert str(e.value).startswith(f"--network_weights {path}:") and needle in str(e.value)


def test_truncated_safetensors(tmp_path):
    path = _lora(tmp_path, {Q: (768, 768)})
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-100])
    with pytest.raises(UserError, match=f"truncated .safetensors file .*the file has {len(raw) - 100}"):
        read_tensor_file(path)


def test_tool_inputs_compare_with_the_most_specific_family(tmp_path):
    from networks.lora_family import check_same_family

    bare = _lora(tmp_path, {Q: (32, 32)}, name="bare.safetensors")
    sd1 = _lora(tmp_path, {Q: (32, 32)}, {"ss_v2": "False"}, name="one.safetensors")
    sd2 = _lora(tmp_path, {Q: (32, 32)}, {"ss_v2": "True"}, name="two.safetensors")
    assert len(check_same_family([bare, sd1])) == 2
    with pytest.raises(UserError, match="two.safetensors is an SD2 LoRA but .*one.safetensors is SD1"):
        check_same_family([bare, sd1, sd2])
