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


def test_spiece_model_without_sentencepiece_names_the_fix(tmp_path, monkeypatch):
    """Without the sentencepiece package (its absence simulated: the test environment has it)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    folder = tmp_path / CACHE_NAME
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match=f"{CACHE_NAME}: .*no tokenizer.json.*pip install sentencepiece"):
        load_t5_tokenizer(None, None, str(tmp_path))


def test_a_sentencepiece_model_file_alone(tmp_path):
    """A T5 folder that has only spiece.model (as google/t5-v1_1-xxl's slow files): a small SentencePiece model
    trained here with T5's special ids; the ids equal SentencePiece's own encoding plus </s>, padded with 0."""
    spm = pytest.importorskip("sentencepiece")
    import io

    text = ["a red circle on a white background", "two blue squares and a green triangle", "a photo of a cat",
            "the quick brown fox jumps over the lazy dog", "a small yellow star next to a big heart"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False)
    folder = tmp_path / CACHE_NAME
    folder.mkdir()
    (folder / "spiece.model").write_bytes(model.getvalue())
    oracle = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = load_t5_tokenizer(None, None, str(tmp_path))
    for prompt in ("a red circle", "a lazy cat jumps over a blue heart", "zebra!"):
        want = oracle.encode(prompt) + [1]
        got = tok(prompt, max_length=len(want) + 3, padding="max_length", truncation=True)
        assert got.input_ids == want + [0, 0, 0], prompt
        assert got.attention_mask == [1] * len(want) + [0, 0, 0]
