"""Attention syntax, weighted tokens and weighted embeddings (spec generation §5.1-5.3)."""
from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.formats.long_prompts import chunk_weights, split_into_chunks
from library.formats.prompt_weighting import apply_weights, parse_prompt_attention, tokenize_weighted
from tests.sampling.fake_tokenizer import BOS, EOS, FakeTokenizer


def _approx(pieces):
    return [(t, pytest.approx(w)) for t, w in pieces]


# ---- §5.1 parse_prompt_attention ----

def test_worked_example():
    assert parse_prompt_attention(r"a (b:1.5) [c] \(d\)") == _approx(
        [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1 / 1.1), (" (d)", 1.0)])


def test_a1111_doctest():
    # the examples in A1111's (and sd-scripts') docstring: other people's expectations
    text = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."
    assert parse_prompt_attention(text) == _approx([
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)])
    assert parse_prompt_attention("an (important) word") == _approx(
        [("an ", 1.0), ("important", 1.1), (" word", 1.0)])
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == _approx([("unnecessaryparens", 1.1)])


def test_nesting_multiplies():
    assert parse_prompt_attention("((x))") == [("x", 1.1 * 1.1)]
    assert parse_prompt_attention("[[x]]") == [("x", (1 / 1.1) * (1 / 1.1))]
    assert parse_prompt_attention("((x:2))") == [("x", 2 * 1.1)]


def test_unbalanced_openers_apply_to_the_rest():
    assert parse_prompt_attention("(a b") == [("a b", 1.1)]
    assert parse_prompt_attention("x [a (b") == _approx([("x ", 1.0), ("a ", 1 / 1.1), ("b", 1.0)])


def test_literal_cases():
    assert parse_prompt_attention("a ) b ]") == [("a ) b ]", 1.0)]  # closer without opener
    assert parse_prompt_attention("a:b") == [("a:b", 1.0)]  # ':' without number
    assert parse_prompt_attention("(a:b)") == [("a:b", 1.1)]
    assert parse_prompt_attention("x:1.5)") == [("x:1.5)", 1.0)]  # weight with no open '('
    assert parse_prompt_attention("a \\ b") == [("a  b", 1.0)]  # lone backslash dropped
    assert parse_prompt_attention("a \\\\ b") == [("a \\ b", 1.0)]  # escaped backslash
    assert parse_prompt_attention("") == [("", 1.0)]


def test_invalid_number_is_text_not_a_crash():
    assert parse_prompt_attention("(a:.)") == [("a:.)", 1.1)]


def test_break_isolation_only_in_gen_img_mode():
    assert parse_prompt_attention("a BREAK b") == [("a BREAK b", 1.0)]
    assert parse_prompt_attention("a BREAK b", break_isolation=True) == [("a ", 1.0), ("BREAK", 1.0), (" b", 1.0)]
    # every substring, also inside a word, and weighted by enclosing brackets
    assert parse_prompt_attention("(x BREAKFAST)", break_isolation=True) == _approx(
        [("x ", 1.1), ("BREAK", 1.1), ("FAST", 1.1)])
    assert parse_prompt_attention("BREAK BREAK", break_isolation=True) == [("BREAK", 1.0), (" ", 1.0), ("BREAK", 1.0)]


# ---- §5.2 tokens and chunks ----

def _words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


@pytest.mark.parametrize("pad", [EOS, 0])
def test_one_chunk_layout(pad: int):
    tok = FakeTokenizer(pad)
    (ids,), (w,) = tokenize_weighted(tok, ["a (b) c"], 3)
    a, b, c = tok.id_of("a"), tok.id_of("b"), tok.id_of("c")
    assert ids == [BOS, a, b, c, EOS] + [pad] * 72
    assert w == pytest.approx([1.0, 1.0, 1.1, 1.0] + [1.0] * 73)
    assert split_into_chunks(ids, pad, EOS, BOS) == [ids]


def test_pad_with_eos():
    tok = FakeTokenizer(0)
    (ids,), _ = tokenize_weighted(tok, ["a"], 1, pad_with="eos")
    assert ids == [BOS, tok.id_of("a")] + [EOS] * 75


@pytest.mark.parametrize("pad", [EOS, 0])
def test_two_chunks_layout(pad: int):
    tok = FakeTokenizer(pad)
    (ids,), (w,) = tokenize_weighted(tok, ["(" + _words(80) + ")"], 3)
    t = [tok.id_of(f"w{i}") for i in range(80)]
    assert len(ids) == 152 and ids == [BOS] + t + [EOS] + [pad] * 70
    rows = split_into_chunks(ids, pad, EOS, BOS)
    last0 = EOS  # SD1: the sequence's last id; SD2: t[75] is a real token -> EOS
    assert rows[0] == [BOS] + t[:75] + [last0]
    assert rows[1] == [BOS] + t[75:] + [EOS] + [pad] * 70
    wrows = chunk_weights(w)
    assert wrows[0] == pytest.approx([1.0] + [1.1] * 75 + [1.0])
    assert wrows[1] == pytest.approx([1.0] + [1.1] * 5 + [1.0] * 71)


@pytest.mark.parametrize("pad", [EOS, 0])
def test_three_chunks_common_length_and_empty_chunk(pad: int):
    tok = FakeTokenizer(pad)
    ids, _ = tokenize_weighted(tok, [_words(160), "x"], 3)
    assert [len(i) for i in ids] == [227, 227]
    t = [tok.id_of(f"w{i}") for i in range(160)]
    long_rows = split_into_chunks(ids[0], pad, EOS, BOS)
    assert long_rows[2] == [BOS] + t[150:] + [EOS] + [pad] * 65
    neg_rows = split_into_chunks(ids[1], pad, EOS, BOS)
    assert neg_rows[0] == [BOS, tok.id_of("x"), EOS] + [pad] * 74
    empty = [BOS, EOS] + [pad] * 75  # SD1 pads with EOS anyway; SD2 gets EOS at position 1
    assert neg_rows[1] == empty and neg_rows[2] == empty


def test_chunk_count_limited_by_multiples_and_truncation(caplog):
    tok = FakeTokenizer()
    with caplog.at_level("WARNING"):
        (ids,), _ = tokenize_weighted(tok, [_words(300)], 3)
    assert len(ids) == 227 and ids[-1] == EOS and ids[-2] == tok.id_of("w224")
    assert "truncated" in caplog.text
    (ids,), _ = tokenize_weighted(tok, [_words(80)], None)  # None = 1 multiple
    assert len(ids) == 77


def test_break_pads_to_77_in_gen_img_mode():
    tok = FakeTokenizer(0)
    (ids,), _ = tokenize_weighted(tok, ["a BREAK b"], 2, break_isolation=True)
    assert ids[:2] == [BOS, tok.id_of("a")]
    assert ids[2:78] == [0] * 76  # pad to 77 tokens, not 75
    assert ids[78] == tok.id_of("b") and ids[79] == EOS
    (ids,), _ = tokenize_weighted(tok, ["a BREAK b"], 2)  # training mode: BREAK is a word
    assert ids[:5] == [BOS, tok.id_of("a"), tok.id_of("BREAK"), tok.id_of("b"), EOS]


def test_token_replacer_expands_ti_tokens():
    tok = FakeTokenizer()
    emb = tok.id_of("emb")

    def replacer(ids):
        return [x for i in ids for x in ([emb, 7, 8] if i == emb else [i])]

    (ids,), (w,) = tokenize_weighted(tok, ["(emb:2) a"], 1, token_replacer=replacer)
    assert ids[:6] == [BOS, emb, 7, 8, tok.id_of("a"), EOS]
    assert w[:5] == [1.0, 2.0, 2.0, 2.0, 1.0]


# ---- §5.3 apply_weights ----

def _emb_and_weights():
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(2, 77, 8, generator=gen) + 0.3
    w = 1 + torch.rand(2, 77, generator=gen)
    return e, w


def test_apply_weights_original_preserves_mean():
    e, w = _emb_and_weights()
    out = apply_weights(e, w, "original")
    torch.testing.assert_close(out.mean(dim=(1, 2)), e.mean(dim=(1, 2)))
    ratio = out / (e * w[..., None])
    torch.testing.assert_close(ratio, ratio[:, :1, :1].expand_as(ratio))


def test_apply_weights_abs_preserves_abs_mean():
    e, w = _emb_and_weights()
    out = apply_weights(e, w, "abs")
    torch.testing.assert_close(out.abs().mean(dim=(1, 2)), e.abs().mean(dim=(1, 2)))


def test_apply_weights_none_and_bad_mode():
    e, w = _emb_and_weights()
    torch.testing.assert_close(apply_weights(e, w, "none"), e * w[..., None])
    with pytest.raises(UserError, match="emb_normalize_mode"):
        apply_weights(e, w, "bogus")
