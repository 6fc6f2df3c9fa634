"""A LoRA / embedding for another model family or shape fails before the work (issue 15 item 8).

Every case runs a script's ``main`` in-process and asserts: exit code 2, exactly one ``error:`` line naming the
problem, no traceback, and nothing written (no image, no trained network, no merged file; the input model's
bytes unchanged). The families come from the spec's key names (file-formats §a.1, pitfall 1): LoRAs are built
by the project's own ``networks.lora`` on tiny models of each family, or hand-written with chosen keys.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gen_img
import sdxl_train_network
import train_network
from library.models.tiny import build_tiny_models
from library.formats.ti_embedding import embedding_state_dict, save_embedding_file, sdxl_embedding_state_dict
from networks import merge_lora, resize_lora, sdxl_merge_lora, svd_merge_lora
from tests.networks.helpers import write_lora
from tests.training.train_helpers import base_args, make_shapes_folder
from tools.make_tiny_model import write_tiny_model

UNLABELLED = {"ss_network_dim": "4"}  # no ss_v2 / base model: only the shapes can tell SD1 from SD2
LABELS = {"sd1": {"ss_v2": "False", "ss_base_model_version": "sd_v1"},
          "sd2": {"ss_v2": "True", "ss_base_model_version": "sd_v2"},
          "sdxl": {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints (``sd1``, ``sd2``, ``sdxl``) and LoRAs (``<family>_lora``, ``sd2_unlabelled``) plus
    broken files (``text``, ``truncated``, ``nomatch``, ``mixed``)."""
    root = tmp_path_factory.mktemp("wrong_family")
    out: dict[str, str] = {}
    for fam in ("sd1", "sd2", "sdxl"):
        out[fam] = str(write_tiny_model(fam, root, formats=("safetensors",))["safetensors"])
        models = build_tiny_models(fam)
        out[f"{fam}_lora"] = write_lora(models, root / f"{fam}_lora.safetensors", metadata=dict(LABELS[fam]))
        if fam == "sd2":
            out["sd2_unlabelled"] = write_lora(models, root / "sd2_unlabelled.safetensors", conv_dim=None,
                                               metadata=dict(UNLABELLED))
    (root / "text.safetensors").write_text("this is not a LoRA, just a text file\n" * 3, encoding="utf-8")
    out["text"] = str(root / "text.safetensors")
    raw = Path(out["sd1_lora"]).read_bytes()
    (root / "truncated.safetensors").write_bytes(raw[: len(raw) * 2 // 3])
    out["truncated"] = str(root / "truncated.safetensors")
    down, up = torch.zeros(4, 32), torch.zeros(32, 4)
    # an SD1-style name of a block the tiny SD1 U-Net does not have: it would change nothing
    save_file({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": down,
               "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": up}, str(root / "nomatch.safetensors"))
    out["nomatch"] = str(root / "nomatch.safetensors")
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down.clone(),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up.clone()}, str(root / "mixed.safetensors"))
    out["mixed"] = str(root / "mixed.safetensors")
    return out


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fails(capsys, script, argv, *needles) -> str:
    """Run ``script.main(argv)``: exit 2, one ``error:`` line containing every needle, no traceback."""
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------ gen_img

def _gen(files, tmp_path, family, *extra):
    out = tmp_path / "images"
    return out, ["--ckpt", files[family], "--outdir", str(out), "--W", "64", "--H", "64", "--steps", "2",
                 "--prompt", "a cat", *extra]


def _lora(path):
    return ["--network_module", "networks.lora", "--network_weights", path]


@pytest.mark.parametrize("model, lora, needles", [
    ("sd1", "sdxl_lora", ["is an SDXL LoRA but the model is SD1"]),
    ("sdxl", "sd1_lora", ["is an SD1 LoRA but the model is SDXL"]),
    ("sd1", "sd2_lora", ["is an SD2 LoRA but the model is SD1"]),
    # same key names, other widths: the tensor and both shapes are named (SD2 tiny TE 64 wide, SD1 32)
    ("sd1", "sd2_unlabelled", ["tensor lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight has shape (4, 64)",
                               "the model's layer weight is (64, 32)"]),
    ("sd1", "text", ["text.safetensors", "not a .safetensors file"]),
    ("sd1", "truncated", ["truncated.safetensors", "truncated"]),
    ("sd1", "nomatch", ["nomatch.safetensors", "none of its 1 modules"]),
    ("sdxl", "mixed", ["mixed.safetensors", "mixes SDXL module names"]),
])
def test_gen_img_refuses_lora(files, tmp_path, capsys, model, lora, needles):
    out, argv = _gen(files, tmp_path, model, *_lora(files[lora]))
    _fails(capsys, gen_img, argv, "--network_weights", *needles)
    assert not out.exists() or not list(out.iterdir())


def test_gen_img_merge_mode_refuses_too(files, tmp_path, capsys):
    out, argv = _gen(files, tmp_path, "sd1", *_lora(files["sdxl_lora"]), "--network_merge")
    _fails(capsys, gen_img, argv, "is an SDXL LoRA but the model is SD1")
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("model, kind, needles", [
    ("sd1", "sdxl", ["is an SDXL embedding but the model is SD1"]),
    ("sdxl", "sd", ["is an SD1/SD2 embedding but the model is SDXL"]),
    ("sd1", "wide", ["is an SD2 embedding but the model is SD1"]),  # 1024-wide vectors: OpenCLIP-H
    ("sd1", "text", ["not a readable .ckpt/.pt tensor file"]),
])
def test_gen_img_refuses_embedding(files, tmp_path, capsys, model, kind, needles):
    path = tmp_path / f"emb_{kind}.{'pt' if kind == 'text' else 'safetensors'}"
    if kind == "sdxl":
        save_embedding_file(path, sdxl_embedding_state_dict(torch.randn(2, 32), torch.randn(2, 64)))
    elif kind == "sd":
        save_embedding_file(path, embedding_state_dict(torch.randn(2, 32)))
    elif kind == "wide":
        save_embedding_file(path, embedding_state_dict(torch.randn(2, 1024)))
    else:
        path.write_text("not an embedding\n", encoding="utf-8")
    out, argv = _gen(files, tmp_path, model, "--textual_inversion_embeddings", str(path))
    _fails(capsys, gen_img, argv, "--textual_inversion_embeddings", str(path), *needles)
    assert not out.exists() or not list(out.iterdir())


# ------------------------------------------------------------------------------ training --network_weights

@pytest.fixture
def data(tmp_path):
    return make_shapes_folder(tmp_path / "data", repeats=1, n=2)


@pytest.mark.parametrize("script, model, lora, extra, needles", [
    (train_network, "sd1", "sdxl_lora", [], ["is an SDXL LoRA but the model is SD1"]),
    (train_network, "sd1", "sd2_lora", [], ["is an SD2 LoRA but the model is SD1"]),
    (sdxl_train_network, "sdxl", "sd1_lora", [], ["is an SD1 LoRA but the model is SDXL"]),
    (train_network, "sd1", "text", [], ["text.safetensors", "not a .safetensors file"]),
    (train_network, "sd1", "truncated", [], ["truncated.safetensors", "truncated"]),
    (train_network, "sd1", "sdxl_lora", ["--dim_from_weights"], ["is an SDXL LoRA but the model is SD1"]),
    # the file's rank (4) differs from --network_dim 8: named with both shapes instead of a size-mismatch trace
    (train_network, "sd1", "sd1_lora", ["--network_dim", "8"], ["lora_down.weight has shape (4, ", "(8, "]),
    (train_network, "sd1", "sd2_unlabelled", [], ["has shape (4, 64)", "(4, 32)"]),
    (train_network, "sd1", "nomatch", [], ["nomatch.safetensors", "none of its"]),
])
def test_training_refuses_network_weights(files, data, tmp_path, capsys, script, model, lora, extra, needles):
    out = tmp_path / "out"
    argv = base_args(Path(files[model]), data, out, 1, "--network_weights", files[lora], *extra)
    _fails(capsys, script, argv, "--network_weights", *needles)
    assert not out.exists() or not list(out.glob("*.safetensors"))


def test_training_text_encoder_file_with_unet_only_is_refused(files, data, tmp_path, capsys):
    """A file that only has text-encoder modules would load nothing into a U-Net-only network."""
    from safetensors.torch import load_file

    sd = {k: v for k, v in load_file(files["sd1_lora"]).items() if k.startswith("lora_te_")}
    te_only = tmp_path / "te_only.safetensors"
    save_file(sd, str(te_only))
    out = tmp_path / "out"
    argv = base_args(Path(files["sd1"]), data, out, 1, "--network_weights", str(te_only),
                     "--network_train_unet_only")
    _fails(capsys, train_network, argv, "te_only.safetensors", "nothing would be loaded")
    assert not out.exists() or not list(out.glob("*.safetensors"))


# ------------------------------------------------------------------------------ LoRA tools

@pytest.mark.parametrize("tool, model, loras, needles", [
    (merge_lora, "sd1", ["sdxl_lora"], ["is an SDXL LoRA but the model is SD1"]),
    (merge_lora, "sd2", ["sd1_lora"], ["is an SD1 LoRA but the model is SD2"]),
    (merge_lora, "sd1", ["sd2_unlabelled"], ["tensor lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                                             "has shape (4, 64)", "layer weight is (64, 32)"]),
    (merge_lora, "sd1", ["nomatch"], ["none of its 1 modules"]),
    (merge_lora, "sd1", ["text"], ["text.safetensors", "not a .safetensors file"]),
    (merge_lora, "sd1", ["sd1_lora", "truncated"], ["truncated.safetensors", "truncated"]),
    (merge_lora, "sd1", ["sd1_lora", "sdxl_lora"], ["is an SDXL LoRA but", "sd1_lora.safetensors is SD1"]),
    (sdxl_merge_lora, "sdxl", ["sd1_lora"], ["is an SD1 LoRA but the model is SDXL"]),
    (sdxl_merge_lora, "sdxl", ["mixed"], ["mixes SDXL module names"]),
])
def test_merge_into_checkpoint_refuses(files, tmp_path, capsys, tool, model, loras, needles):
    before = _sha(files[model])
    out = tmp_path / "merged.safetensors"
    paths = [files[name] for name in loras]
    _fails(capsys, tool, ["--sd_model", files[model], "--models", *paths, "--ratios", *["1"] * len(paths),
                          "--save_to", str(out)], "--models", *needles)
    assert not out.exists() and _sha(files[model]) == before


@pytest.mark.parametrize("tool, loras, extra, needles", [
    (merge_lora, ["sd1_lora", "sd2_lora"], [], ["is an SD2 LoRA but", "is SD1"]),
    (merge_lora, ["sdxl_lora"], [], ["merge_lora.py merges SD1/SD2 LoRAs"]),
    (merge_lora, ["sd1_lora"], ["--v2"], ["is an SD1 LoRA but --v2"]),
    (sdxl_merge_lora, ["sd1_lora"], [], ["sdxl_merge_lora.py merges SDXL LoRAs"]),
    (merge_lora, ["sd1_lora", "sd2_unlabelled"], ["--concat"], ["(4, 64)", "(4, 32)"]),
    (svd_merge_lora, ["sd1_lora", "sdxl_lora"], [], ["is an SDXL LoRA but", "is SD1"]),
    (svd_merge_lora, ["sd1_lora", "sd2_unlabelled"], [], ["(4, 64)", "(4, 32)"]),
    (svd_merge_lora, ["text", "sd1_lora"], [], ["text.safetensors", "not a .safetensors file"]),
])
def test_lora_lora_tools_refuse_mixed_inputs(files, tmp_path, capsys, tool, loras, extra, needles):
    out = tmp_path / "merged.safetensors"
    paths = [files[name] for name in loras]
    _fails(capsys, tool, ["--models", *paths, "--ratios", *["1"] * len(paths), "--save_to", str(out), *extra],
           "--models", *needles)
    assert not out.exists()


@pytest.mark.parametrize("lora, needles", [
    ("mixed", ["mixes SDXL module names", "lora_te1_", "lora_unet_down_blocks_"]),
    ("text", ["not a .safetensors file"]),
    ("truncated", ["truncated"]),
])
def test_resize_refuses(files, tmp_path, capsys, lora, needles):
    out = tmp_path / "resized.safetensors"
    _fails(capsys, resize_lora, ["--model", files[lora], "--save_to", str(out), "--new_rank", "2"],
           "--model", files[lora], *needles)
    assert not out.exists()
