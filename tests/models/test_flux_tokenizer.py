"""The T5 tokenizer for FLUX, offline: from the model folder, a --t5xxl folder or --tokenizer_cache_dir."""
import importlib.util
import shutil

import pytest

from library.errors import UserError
from library.models.flux_config import T5_TOKENIZER_HUB_ID
from library.models.flux_tiny import _WORDS
from library.models.t5_tokenizer import load_t5_tokenizer

CACHE_NAME = T5_TOKENIZER_HUB_ID.replace("/", "_")  # sd-scripts' cache layout: the hub id with "/" -> "_"


def _expected(words: list[str]) -> list[int]:
    """T5's layout written out: pad 0, </s> 1, unk 2, then the tiny vocabulary's "▁word" pieces in order."""
    return [3 + _WORDS.index(w) for w in words] + [1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_from_the_diffusers_folder(tiny_flux):
    tok = load_t5_tokenizer(str(tiny_flux["dev"]["diffusers"]))
    assert tok("a red circle").input_ids == _expected(["a", "red", "circle"])


def test_from_the_cache_dir(tiny_flux):
    tok = load_t5_tokenizer(None, str(tiny_flux["dev"]["t5xxl"]), str(tiny_flux["dev"]["tokenizer_cache_dir"]))
    ids = tok("a photo of a cat", max_length=8, padding="max_length", truncation=True)
    assert ids.input_ids == _expected(["a", "photo", "of", "a", "cat"]) + [0, 0]
    assert ids.attention_mask == [1] * 6 + [0, 0]


def test_from_a_t5xxl_folder(tiny_flux, tmp_path):
    """--t5xxl may be a transformers T5 folder that carries its tokenizer."""
    t5_folder = tmp_path / "t5"
    shutil.copytree(tiny_flux["dev"]["diffusers"] / "text_encoder_2", t5_folder)
    shutil.copytree(tiny_flux["dev"]["tokenizer_cache_dir"] / CACHE_NAME, t5_folder, dirs_exist_ok=True)
    tok = load_t5_tokenizer(None, str(t5_folder))
    assert tok("blue square").input_ids == _expected(["blue", "square"])


def test_none_found_offline_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no T5 tokenizer found.*--tokenizer_cache_dir.*google_t5-v1_1-xxl"):
        load_t5_tokenizer(None, None, str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed here")
def test_spiece_model_without_sentencepiece_names_the_fix(tmp_path):
    folder = tmp_path / CACHE_NAME
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match=f"{CACHE_NAME}: .*no tokenizer.json.*pip install sentencepiece"):
        load_t5_tokenizer(None, None, str(tmp_path))
