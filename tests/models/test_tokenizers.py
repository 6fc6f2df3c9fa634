"""Offline CLIP tokenizers: ids checked against open_clip's own SimpleTokenizer (an independent
implementation), plus the folder priority and cache rules of spec cli-options §2."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re

import pytest
from transformers import CLIPTokenizer

from library.errors import UserError
from library.models import tokenizers as tk
from library.models.tokenizers import build_clip_tokenizer, load_tokenizers, save_tokenizers, token_text

BOS, EOS = 49406, 49407

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
    "(masterpiece:1.2), [bad]",
    "((best quality)), (worst quality:0.8), [[blurry]], {extra}",
    r"\(x\) \[y\] a \\ b",
    "it's a dog's life, we'll see, they're here, i'd go, you've won, don't",
    "hello world!!! what?! ... --- ;;; ::",
    "! !! !!! a!b",
    "3.14159 and 1,000,000 and 2023-07-19 and 42nd",
    "rgb(255, 128, 0) #ff8000 50% 100$ @user",
    "café naïve résumé über straße Ångström",
    "ΟΔΟΣ ΣΑΣ, Σίσυφος",  # Greek final sigma: Python lower() vs per-character lowercase differ
    "İstanbul ǅemal ß ẞ",
    "猫が好き 一只可爱的猫 고양이",
    "кошка на крыше",
    "emoji 😀🐱 ❤️ 👍🏽 and flags 🇯🇵",
    "a\n\nb\tc   d \r\n e",
    "   leading and trailing spaces   ",
    "“curly quotes” and ‘single’ ones",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "ligatures: ﬁne ﬂower",
    "html &amp; entities &lt;tag&gt; &amp;amp; &quot;q&quot;",
    "a &lt;b&gt; &amp;amp; <i>",  # literal `<`: ftfy keeps the entities, open_clip's html.unescape does not
    "mojibake cafÃ© test",
    "zero\u200bwidth and non\u00a0breaking space",
    "control\x07char and soft\u00adhyphen",
    "tags_with_underscores, score_9, score_8_up",
    "",
    "a",
    "xyzzyplughfoobarqux antidisestablishmentarianism",
    ", ".join(f"tag{i}" for i in range(60)),
    "a very long prompt " * 30,
    " ".join(["masterpiece, (best quality:1.3), detailed background"] * 12),
    "猫" * 100,
]


@pytest.fixture(scope="module")
def oracle():
    """open_clip's SimpleTokenizer; its package __init__ needs torchvision, so load the file by path."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        spec = importlib.util.find_spec("open_clip")
        path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
        mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        SimpleTokenizer = module.SimpleTokenizer
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def sd1():
    return build_clip_tokenizer("eos")


@pytest.fixture(scope="module")
def sd2():
    return build_clip_tokenizer("!")


def _padded(ids: list[int], pad: int, length: int = 77) -> list[int]:
    """sd-scripts' `padding="max_length", truncation=True`: BOS, at most length-2 ids, EOS, pads."""
    row = [BOS] + ids[: length - 2] + [EOS]
    return row + [pad] * (length - len(row))


def test_vocabulary_shape(sd1):
    assert len(sd1) == 49408
    assert (sd1.bos_token_id, sd1.eos_token_id, sd1.pad_token_id) == (BOS, EOS, EOS)
    assert sd1.model_max_length == 77
    specials = ["!", "!</w>", "<|startoftext|>", "<|endoftext|>"]
    assert sd1.convert_ids_to_tokens([0, 256, 49406, 49407]) == specials


@pytest.mark.parametrize("text", CORPUS)
def test_bpe_ids_match_open_clip(text, sd1, sd2, oracle):
    expected = oracle.encode(text)
    assert sd1(text, add_special_tokens=False).input_ids == expected
    assert sd2(text, add_special_tokens=False).input_ids == expected


@pytest.mark.parametrize("text", CORPUS)
def test_padded_encodings(text, sd1, sd2, oracle):
    ids = oracle.encode(text)

    def encode(tok, length=77):
        return tok(text, padding="max_length", truncation=True, max_length=length).input_ids

    # open_clip pads with 0 after the EOS (SD2 / SDXL-2); SD1's tokenizer pads with EOS.
    assert encode(sd2) == oracle([text])[0].tolist() == _padded(ids, 0)
    assert encode(sd1) == _padded(ids, EOS)
    # --max_token_length 225 tokenizes to 227 before cutting into rows (dataset-config §8.1).
    assert encode(sd1, 227) == _padded(ids, EOS, 227)


def test_exclamation_mark_is_not_padding(sd2):
    # Pad `!` is id 0, but a literal `!` stays `!</w>` (256) as in open_clip (diffusers issue #4153).
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0
    assert sd2("hi! !!", add_special_tokens=False).input_ids == [1883, 256, 748]


def test_batch_and_pickle(sd2):
    texts = ["“A” cat", "ＡＢＣ dog"]
    batch = sd2(texts, padding="max_length", max_length=77).input_ids
    assert batch == [sd2(t, padding="max_length", max_length=77).input_ids for t in texts]
    # DataLoader workers started with spawn pickle the dataset and its tokenizers.
    clone = pickle.loads(pickle.dumps(sd2))
    assert type(clone) is type(sd2) and clone.pad_token_id == 0
    assert clone(texts, padding="max_length", max_length=77).input_ids == batch


def test_added_tokens_are_kept_verbatim():
    tok = build_clip_tokenizer()
    tok.add_tokens(["MyEmb", "MyEmb1"])
    first = len(tok) - 2
    ids = tok("a ＣＡＴ MyEmb,MyEmb1 “x”", add_special_tokens=False).input_ids
    assert ids == [320, 2368, first, 267, first + 1, 257, 343, 257]


def test_sdxl_pair():
    tok1, tok2 = load_tokenizers("sdxl")
    assert (tok1.pad_token_id, tok2.pad_token_id) == (EOS, 0)
    text = "a photo of an astronaut riding a horse!"
    a = tok1(text, padding="max_length", max_length=77).input_ids
    b = tok2(text, padding="max_length", max_length=77).input_ids
    n = a.index(EOS) + 1
    assert a[:n] == b[:n] and set(a[n:]) == {EOS} and set(b[n:]) == {0}
    (only,) = load_tokenizers("sd2")
    assert only.pad_token_id == 0
    with pytest.raises(ValueError, match="family"):
        load_tokenizers("sd3")


def test_diffusers_folder_tokenizer_has_priority(tmp_path):
    # A folder written by plain transformers that declares pad `!` and holds an extra word.
    vocab, merges = tk._clip_vocabulary()
    own = CLIPTokenizer(vocab=vocab, merges=list(merges), pad_token="!", model_max_length=77)
    own.add_tokens(["<cat-toy>"])
    own.save_pretrained(tmp_path / "model" / "tokenizer")
    cache = tmp_path / "cache"
    (tok,) = load_tokenizers("sd1", model_path=str(tmp_path / "model"), tokenizer_cache_dir=str(cache))
    assert tok.pad_token == "!" and tok.pad_token_id == 0  # the folder's pad, not SD1's EOS
    assert tok("<cat-toy>", add_special_tokens=False).input_ids == [49408]
    assert tok("wow!", add_special_tokens=False).input_ids[-1] == 256  # `!` not split as pad
    assert not cache.exists()  # nothing built, nothing cached
    # SD2 forces pad `!` whatever the folder says; an SDXL folder without tokenizer_2/ falls back.
    build_clip_tokenizer().save_pretrained(tmp_path / "eos" / "tokenizer")
    (tok,) = load_tokenizers("sd2", model_path=str(tmp_path / "eos"))
    assert tok.pad_token_id == 0
    tok1, tok2 = load_tokenizers("sdxl", model_path=str(tmp_path / "eos"))
    assert (tok1.pad_token_id, tok2.pad_token_id) == (EOS, 0)


def test_transformers4_folder_layout(tmp_path, sd2):
    # The hub's SD2 `tokenizer/`: vocab.json + merges.txt, pad `!` only in special_tokens_map.json.
    folder = tmp_path / "tokenizer"
    build_clip_tokenizer().save_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    assert len((folder / "merges.txt").read_text().splitlines()) == 1 + 49152 - 256 - 2
    assert CLIPTokenizer.from_pretrained(folder).pad_token == "!"  # transformers reads it as SD2's folder
    (tok,) = load_tokenizers("sd2", model_path=str(tmp_path))
    text = "Hello!! “world”"
    assert tok(text).input_ids == sd2(text).input_ids == [BOS, 3306, 748, 257, 1002, 257, EOS]


def test_cache_dir_save_then_reuse(tmp_path):
    cache = tmp_path / "cache"
    tok1, tok2 = load_tokenizers("sdxl", tokenizer_cache_dir=str(cache))
    names = sorted(p.name for p in cache.iterdir())
    assert names == ["laion_CLIP-ViT-bigG-14-laion2B-39B-b160k", "openai_clip-vit-large-patch14"]
    config = json.loads((cache / names[0] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer"
    # Other readers (plain transformers) get the same ids from the cached folder.
    plain = CLIPTokenizer.from_pretrained(cache / names[1])
    assert plain("a red cat").input_ids == tok1("a red cat").input_ids
    # Mark the cached SD1 tokenizer; the next run must read it rather than rebuild.
    tok1.add_tokens(["<marker>"])
    tok1.save_pretrained(cache / names[1])
    again1, again2 = load_tokenizers("sdxl", tokenizer_cache_dir=str(cache))
    assert again1("<marker>", add_special_tokens=False).input_ids == [49408]
    assert again2.pad_token_id == 0
    (sd2,) = load_tokenizers("sd2", tokenizer_cache_dir=str(cache))
    assert (cache / "stabilityai_stable-diffusion-2").is_dir() and sd2.pad_token_id == 0


def test_save_tokenizers_round_trip(tmp_path):
    pair = load_tokenizers("sdxl")
    save_tokenizers(pair, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer", "tokenizer_2"]
    loaded = load_tokenizers("sdxl", model_path=str(tmp_path))
    text = CORPUS[4]
    for a, b in zip(pair, loaded):
        assert a.pad_token_id == b.pad_token_id
        assert a(text, padding="max_length").input_ids == b(text, padding="max_length").input_ids


def test_unreadable_folder_names_it(tmp_path):
    folder = tmp_path / "model" / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(UserError, match=re.escape(f"cannot read the tokenizer folder {folder}")):
        load_tokenizers("sd1", model_path=str(tmp_path / "model"))


def test_missing_open_clip_is_a_user_error(monkeypatch):
    real = importlib.util.find_spec
    fake = lambda name, *a: None if name == "open_clip" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    tk._clip_vocabulary.cache_clear()
    try:
        with pytest.raises(UserError, match="pip install --no-deps open-clip-torch"):
            build_clip_tokenizer()
    finally:
        monkeypatch.undo()
        tk._clip_vocabulary.cache_clear()


def test_token_text_as_open_clip_decodes(sd1, oracle):
    """`token_text` (lora_interrogator's printout) of every id equals open_clip's decode, stripped: byte characters
    back to UTF-8 (half an emoji -> U+FFFD), `</w>` -> space."""
    assert token_text(sd1, 320) == "a" and token_text(sd1, BOS) == "<|startoftext|>"  # open_clip: <start_of_text>
    different = [i for i in range(BOS) if token_text(sd1, i) != oracle.decode([i]).strip()]
    assert different == []
