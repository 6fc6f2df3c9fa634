"""Prompt weighting: `(text:1.2)` attention syntax, weighted token ids, weighted embeddings.

spec generation.md §5.1-5.3 (also training's `--weighted_captions`, losses-and-noise.md §9).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch

from library.errors import UserError
from library.formats.long_prompts import CHUNK_LENGTH, CHUNK_TOKENS, count_chunks, pad_to_chunks

logger = logging.getLogger(__name__)

Piece = tuple[str, float]
TokenReplacer = Callable[[list[int]], list[int]]

BREAK = "BREAK"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
EMB_NORMALIZE_MODES = ("original", "abs", "none")

# A1111's tokenizer for the attention syntax, as sd-scripts copies it (order of alternatives matters)
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)


def parse_prompt_attention(text: str, break_isolation: bool = False) -> list[Piece]:
    """Split a prompt into (text, weight) pieces. spec gen §5.1.

    `break_isolation` is gen_img's mode: every substring "BREAK" becomes its own piece, never merged.
    """
    if break_isolation:
        # gen_img's trick: wrap BREAK in lone backslashes, which the regex turns into empty pieces,
        # so "BREAK" always arrives as a piece of its own (also inside words: "BREAKFAST")
        text = text.replace(BREAK, "\\" + BREAK + "\\")
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])  # escape, or a lone "\" that yields an empty piece (dropped)
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets and _is_float(weight):
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            # plain text, ":" without a number, a closer without an opener, or ":..)" that is no number
            # (upstream crashes on float("..") there; we keep it as text)
            res.append([token, 1.0])

    # unbalanced openers apply to everything after them
    for pos in round_brackets:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    return _merge_equal_weights(res, break_isolation)


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _merge_equal_weights(res: list[list[Any]], keep_break: bool) -> list[Piece]:
    """Merge runs of neighbours with equal weight (BREAK pieces excepted in gen_img mode)."""
    i = 0
    while i + 1 < len(res):
        is_break = keep_break and (res[i][0].strip() == BREAK or res[i + 1][0].strip() == BREAK)
        if res[i][1] == res[i + 1][1] and not is_break:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    # empty pieces (from lone backslashes next to a BREAK) tokenise to nothing; drop them
    pieces = [(t, w) for t, w in res if t]
    return pieces or [("", 1.0)]


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` with BOS/EOS, from a HF tokenizer or anything callable returning `input_ids`."""
    out = tokenizer(text)
    if isinstance(out, Mapping):
        return list(out["input_ids"])
    return list(getattr(out, "input_ids", out))


def weighted_tokens(tokenizer: Any, pieces: Sequence[Piece], max_tokens: int, break_isolation: bool = False,
                    token_replacer: TokenReplacer | None = None) -> tuple[list[int], list[float], bool]:
    """Tokenise each piece (BOS/EOS stripped), copy its weight to its tokens; truncate. spec gen §5.2.

    Returns (tokens, weights, truncated). In gen_img mode a BREAK piece pads with PAD ids up to the next
    multiple of 77 tokens (not 75: spec pitfall 9). `token_replacer` expands TI multi-vector tokens.
    """
    chunk = getattr(tokenizer, "model_max_length", CHUNK_LENGTH)
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in pieces:
        if break_isolation and text.strip() == BREAK:
            pad_len = chunk - len(tokens) % chunk
            tokens += [tokenizer.pad_token_id] * pad_len
            weights += [1.0] * pad_len
            continue
        ids = token_ids(tokenizer, text)[1:-1]
        if token_replacer is not None:
            ids = token_replacer(ids)
        tokens += ids
        weights += [weight] * len(ids)
        if len(tokens) > max_tokens:
            break
    truncated = len(tokens) > max_tokens
    return tokens[:max_tokens], weights[:max_tokens], truncated


def tokenize_weighted(tokenizer: Any, prompts: Sequence[str], max_embeddings_multiples: int | None,
                      pad_with: str = "pad", break_isolation: bool = False,
                      token_replacer: TokenReplacer | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Prompts (positive and negatives together) -> ids and weights of one common length 75n+2. spec §5.2.

    `pad_with="pad"`: gen_img and the SDXL LPW pipeline; `"eos"`: the SD1/2 LPW pipeline and
    `--weighted_captions`. Split the results with `split_into_chunks` / `chunk_weights`.
    """
    if pad_with not in ("pad", "eos"):
        raise ValueError(f"pad_with must be 'pad' or 'eos', not {pad_with!r}")
    multiples = max_embeddings_multiples or 1
    parsed = [parse_prompt_attention(p, break_isolation) for p in prompts]
    results = [weighted_tokens(tokenizer, pieces, CHUNK_TOKENS * multiples, break_isolation, token_replacer)
               for pieces in parsed]
    if any(truncated for _, _, truncated in results):
        logger.warning("Prompt was truncated. Try to shorten the prompt or increase max_embeddings_multiples")
    n = count_chunks((len(t) for t, _, _ in results), multiples)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if pad_with == "pad" else eos
    padded = [pad_to_chunks(t, w, n, bos, eos, pad) for t, w, _ in results]
    return [ids for ids, _ in padded], [w for _, w in padded]


def apply_weights(embeddings: torch.Tensor, weights: torch.Tensor, mode: str = "original") -> torch.Tensor:
    """Scale (B, T, D) embeddings by (B, T) weights; original/abs keep the per-prompt mean. spec gen §5.3."""
    if mode not in EMB_NORMALIZE_MODES:
        raise UserError(f"--emb_normalize_mode {mode!r}: choose one of {', '.join(EMB_NORMALIZE_MODES)}")
    weights = weights.to(device=embeddings.device, dtype=embeddings.dtype).unsqueeze(-1)
    if mode == "none":
        return embeddings * weights

    def mean(x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32, cast back like upstream so half-precision results match
        x = x.float().abs() if mode == "abs" else x.float()
        return x.mean(dim=(-2, -1)).to(embeddings.dtype)

    previous = mean(embeddings)
    weighted = embeddings * weights
    return weighted * (previous / mean(weighted))[:, None, None]
