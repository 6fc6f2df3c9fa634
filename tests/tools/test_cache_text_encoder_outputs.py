"""tools/cache_text_encoder_outputs.py writes the ``_te_outputs.npz`` files SDXL training reads (spec
dataset-config §10.1). Oracle: both tiny SDXL text encoders run through transformers by hand, with
sd-scripts' token padding (TE1 pads with EOS, TE2 with id 0) and layers (penultimate hidden states, TE2's
projected pooled output)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import sdxl_train_network
from library.data import te_cache
from library.models.tokenizers import build_clip_tokenizer
from tests.training.train_helpers import base_args, make_shapes_folder
from tools import cache_text_encoder_outputs as tool
from tools.make_tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
EOS = 49407


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return write_tiny_model("sdxl", tmp_path_factory.mktemp("sdxl"))


def _oracle(folder: Path, caption: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hidden_state1, hidden_state2, pool2 of one caption, computed directly with transformers."""
    ids = build_clip_tokenizer()(caption, truncation=True, max_length=77)["input_ids"]
    ids1 = torch.tensor([ids + [EOS] * (77 - len(ids))])
    ids2 = torch.tensor([ids + [0] * (77 - len(ids))])
    te1 = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
    with torch.no_grad():
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
        # sd-scripts' pool: the final-layer-normed state at the first EOS, through the projection
        last = te2.text_model.final_layer_norm(out2.hidden_states[-1])
        pool = te2.text_projection(last[0, ids.index(EOS)])[None]
    return h1[0].numpy(), out2.hidden_states[-2][0].numpy(), pool[0].numpy()


def _run_tool(model, data: Path, *extra: str) -> None:
    tool.main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
               "--caption_extension", ".caption", "--sdxl", "--cache_text_encoder_outputs_to_disk",
               "--console_log_simple", *extra])


def test_files_hold_the_text_encoders_outputs(tiny_sdxl, tmp_path):
    data = make_shapes_folder(tmp_path / "data", repeats=1, n=3)
    _run_tool(tiny_sdxl["safetensors"], data)
    files = sorted((data / "1_sks shape").glob("*_te_outputs.npz"))
    assert [f.name for f in files] == [f"{i}_te_outputs.npz" for i in range(3)]
    for i, f in enumerate(files):
        with np.load(f) as npz:
            assert sorted(npz.files) == ["hidden_state1", "hidden_state2", "pool2"]
            expected = _oracle(tiny_sdxl["diffusers"], f"a sks shape, number {i}")
            for key, want in zip(("hidden_state1", "hidden_state2", "pool2"), expected):
                assert npz[key].dtype == np.float32 and npz[key].shape == want.shape
                np.testing.assert_allclose(npz[key], want, atol=1e-5, rtol=1e-4)


def test_trainer_reads_the_files_without_encoding_again(tiny_sdxl, tmp_path, monkeypatch):
    data = make_shapes_folder(tmp_path / "data", repeats=1, n=2)
    _run_tool(tiny_sdxl["safetensors"], data)
    files = sorted(data.rglob("*_te_outputs.npz"))
    stamps = {f: f.stat().st_mtime_ns for f in files}

    def never(path, outputs):
        raise AssertionError(f"training wrote {path} again")

    monkeypatch.setattr(te_cache, "save_te_outputs", never)
    out = tmp_path / "out"
    sdxl_train_network.main(base_args(tiny_sdxl["safetensors"], data, out, 2, "--network_train_unet_only",
                                      "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"))
    assert (out / "lora.safetensors").exists()
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ss_dataset_dirs"]) == {"1_sks shape": {"n_repeats": 1, "img_count": 2}}


def test_skip_existing_keeps_files_and_default_rewrites(tiny_sdxl, tmp_path):
    data = make_shapes_folder(tmp_path / "data", repeats=1, n=1)
    target = data / "1_sks shape" / "0_te_outputs.npz"
    target.write_bytes(b"not an npz")
    _run_tool(tiny_sdxl["safetensors"], data, "--skip_existing")
    assert target.read_bytes() == b"not an npz"
    _run_tool(tiny_sdxl["safetensors"], data)
    with np.load(target) as npz:
        np.testing.assert_allclose(npz["pool2"], _oracle(tiny_sdxl["diffusers"], "a sks shape, number 0")[2],
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("drop, extra, message", [
    ("--cache_text_encoder_outputs_to_disk", [], "--cache_text_encoder_outputs_to_disk is required"),
    ("--sdxl", [], "--sdxl is required"),
    (None, ["--shuffle_caption"], "cannot be cached (--cache_text_encoder_outputs) with shuffle_caption"),
    (None, ["--dataset_class", "a.B"], "--dataset_class cannot be used with this tool"),
])
def test_bad_input_is_one_line(tiny_sdxl, tmp_path, capsys, drop, extra, message):
    data = make_shapes_folder(tmp_path / "data", repeats=1, n=1)
    argv = ["--pretrained_model_name_or_path", str(tiny_sdxl["safetensors"]), "--train_data_dir", str(data),
            "--resolution", "64", "--sdxl", "--cache_text_encoder_outputs_to_disk", *extra]
    if drop:
        argv.remove(drop)
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(data.rglob("*_te_outputs.npz"))


def test_every_upstream_option_parses():
    upstream = json.loads((ROOT / "library" / "config" / "sd_scripts_options.json").read_text(encoding="utf-8"))
    ours = {a.dest for a in tool.setup_parser()._actions}
    assert set(upstream["scripts"]["tools/cache_text_encoder_outputs"]) - ours == set()
    assert os.path.basename(tool.__file__) == "cache_text_encoder_outputs.py"
