"""Textual Inversion embedding files, spec file-formats §(c); diffusers' loader is the oracle."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError
from library.formats.modelspec import build_modelspec
from library.formats.ti_embedding import (
    embedding_state_dict, load_embedding, load_sdxl_embedding, read_embedding_file, save_embedding_file,
    sdxl_embedding_state_dict,
)


def _vectors(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ext", ["safetensors", "pt", "ckpt"])
def test_sd_round_trip(tmp_path, ext):
    vectors = _vectors(3, 768)
    path = tmp_path / f"emb.{ext}"
    meta = build_modelspec("sd1", False, "textual-inversion", timestamp=1.0, output_name="emb")
    save_embedding_file(path, embedding_state_dict(vectors), meta)
    assert set(read_embedding_file(path)) == {"emb_params"}
    loaded = load_embedding(path)
    assert torch.equal(loaded, vectors) and loaded.dtype == torch.float32
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    if ext == "safetensors":
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == meta
    else:  # .pt/.ckpt: the same bare dict, not A1111's layout
        raw = torch.load(path, weights_only=True)
        assert list(raw) == ["emb_params"]


def test_save_precision(tmp_path):
    path = tmp_path / "emb.safetensors"
    save_embedding_file(path, embedding_state_dict(_vectors(2, 1024)), dtype=torch.float16)
    assert load_embedding(path).dtype == torch.float16


def test_sdxl_round_trip(tmp_path):
    clip_l, clip_g = _vectors(2, 768), _vectors(2, 1280, seed=1)
    for ext in ("safetensors", "pt"):
        path = tmp_path / f"x.{ext}"
        save_embedding_file(path, sdxl_embedding_state_dict(clip_l, clip_g),
                            build_modelspec("sdxl", False, "textual-inversion", timestamp=1.0))
        got_l, got_g = load_sdxl_embedding(path)
        assert torch.equal(got_l, clip_l) and torch.equal(got_g, clip_g)


def test_a1111_string_to_param(tmp_path):
    vectors = _vectors(4, 768)
    path = tmp_path / "a1111.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "a1111",
                "step": 1000, "sd_checkpoint": "abcd", "sd_checkpoint_name": "model"}, path)
    assert torch.equal(load_embedding(path), vectors)


def test_first_tensor_and_1d_handling(tmp_path):
    path = tmp_path / "one.safetensors"
    vector = torch.randn(768)
    save_file({"z_second": torch.zeros(2, 768), "a_first": vector}, str(path))  # header order is by name
    assert load_embedding(path).shape == (768,)  # generation keeps it 1-D
    assert torch.equal(load_embedding(path, for_trainer=True), vector.unsqueeze(0))  # the trainer: (1, d)
    sdxl = tmp_path / "onex.pt"
    torch.save({"clip_l": torch.randn(768), "clip_g": torch.randn(1280)}, sdxl)
    got_l, got_g = load_sdxl_embedding(sdxl, for_trainer=True)
    assert got_l.shape == (1, 768) and got_g.shape == (1, 1280)


def _write_bad(tmp_path, kind):
    path = tmp_path / ("bad.safetensors" if kind == "garbage-st" else "bad.pt")
    if kind in ("garbage-st", "garbage-pt"):
        path.write_bytes(b"this is not a model file")
    elif kind == "no-tensor":
        torch.save({"name": "x", "step": 3}, path)
    elif kind == "not-a-dict":
        torch.save([torch.zeros(1, 768)], path)
    elif kind == "empty":
        torch.save({}, path)
    elif kind == "3d":
        torch.save({"emb_params": torch.zeros(1, 2, 768)}, path)
    return path


@pytest.mark.parametrize("kind", ["garbage-st", "garbage-pt", "no-tensor", "not-a-dict", "empty", "3d"])
def test_malformed_file_is_a_user_error(tmp_path, kind):
    path = _write_bad(tmp_path, kind)
    with pytest.raises(UserError, match=str(path)):
        load_embedding(path, for_trainer=True)


def test_missing_file_and_sdxl_keys(tmp_path):
    with pytest.raises(UserError, match="not found: .*missing.pt"):
        load_embedding(tmp_path / "missing.pt")
    path = tmp_path / "sd.pt"
    save_embedding_file(path, embedding_state_dict(_vectors(1, 768)))
    with pytest.raises(UserError, match="neither 'clip_l' nor 'clip_g'"):
        load_sdxl_embedding(path)


def test_failed_save_leaves_nothing(tmp_path):
    path = tmp_path / "emb.safetensors"
    save_embedding_file(path, embedding_state_dict(_vectors(1, 8)))
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_embedding_file(path, embedding_state_dict(_vectors(1, 8, seed=3)), {"bad": 1})  # non-str value
    assert path.read_bytes() == before  # the earlier file is intact
    assert os.listdir(tmp_path) == ["emb.safetensors"]


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from tools.make_tiny_model import write_tiny_model

    paths = write_tiny_model("sd1", tmp_path_factory.mktemp("tiny_ti"), formats=("diffusers",))
    return StableDiffusionPipeline.from_pretrained(str(paths["diffusers"]), safety_checker=None)


@pytest.mark.parametrize("ext, n", [("safetensors", 3), ("pt", 2), ("safetensors", 1)])
def test_diffusers_load_textual_inversion(tiny_pipe, tmp_path, ext, n):
    vectors = _vectors(n, 32, seed=n)  # the tiny text encoder is 32 wide
    path = tmp_path / f"mine.{ext}"
    save_embedding_file(path, embedding_state_dict(vectors),
                        build_modelspec("sd1", False, "textual-inversion", timestamp=1.0))
    token = f"mytok{ext}{n}"
    tiny_pipe.load_textual_inversion(str(path), token=token)
    tokens = [token] + [f"{token}_{i}" for i in range(1, n)]  # diffusers' names for the extra vectors
    ids = tiny_pipe.tokenizer.convert_tokens_to_ids(tokens)
    assert tiny_pipe.tokenizer.unk_token_id not in ids
    rows = tiny_pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, vectors)
