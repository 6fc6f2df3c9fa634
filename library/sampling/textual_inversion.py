"""Textual Inversion embeddings at generation time (spec generation §8, file-formats §c).

Each file adds the tokens `stem, stem1, …` (one per vector) to the tokenizer(s), sets those rows of the text
encoder's embedding table, and expands the token `stem` in prompts to all of them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from library.errors import UserError
from library.formats.ti_embedding import load_embedding, load_sdxl_embedding
from networks.lora_family import check_embedding_matches

logger = logging.getLogger(__name__)


@dataclass
class TokenExpansion:
    """Per tokenizer: first token id -> all vector token ids; callable as a `TokenReplacer`."""

    expansions: dict[int, list[int]] = field(default_factory=dict)

    def __call__(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for i in ids:
            out.extend(self.expansions.get(i, [i]))
        return out


def token_strings(stem: str, n_vectors: int) -> list[str]:
    """`stem, stem1, …, stem{n-1}`: the tokens one embedding file adds. spec §8."""
    return [stem] + [f"{stem}{i}" for i in range(1, n_vectors)]


def _vectors_per_encoder(family: str, path: str) -> list[torch.Tensor]:
    """The vectors for each text encoder: SD1/2 the first tensor, SDXL `clip_l` and `clip_g`."""
    check_embedding_matches(path, family)  # an SDXL file's clip_l would otherwise load into SD1 unnoticed
    if family != "sdxl":
        vectors = [load_embedding(path, for_trainer=True)]
    else:
        clip_l, clip_g = load_sdxl_embedding(path, for_trainer=True)
        if clip_l is None or clip_g is None:
            raise UserError(f"--textual_inversion_embeddings {path}: an SDXL embedding needs both clip_l and clip_g")
        vectors = [clip_l, clip_g]
    counts = {v.shape[0] for v in vectors}
    if len(counts) != 1:
        raise UserError(f"--textual_inversion_embeddings {path}: clip_l and clip_g have different vector counts")
    return vectors


def _add_to_encoder(tokenizer: Any, te: torch.nn.Module, tokens: list[str], vectors: torch.Tensor,
                    path: str) -> list[int]:
    """Add `tokens` (must be new), grow the TE's embedding table and set their rows; return their ids."""
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise UserError(f"--textual_inversion_embeddings {path}: token {tokens[0]!r} (or one of {tokens[1:]}) "
                        "already exists in the tokenizer; rename the file")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise UserError(f"--textual_inversion_embeddings {path}: tokens were not added contiguously")
    te.resize_token_embeddings(len(tokenizer))
    table = te.get_input_embeddings().weight
    if vectors.shape[1] != table.shape[1]:
        raise UserError(f"--textual_inversion_embeddings {path}: vectors have width {vectors.shape[1]}, the text "
                        f"encoder expects {table.shape[1]} (embedding for another model family?)")
    with torch.no_grad():
        table[ids[0]: ids[0] + len(ids)] = vectors.to(table)
    return ids


def load_textual_inversion(family: str, text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any],
                           paths: Sequence[str]) -> list[TokenExpansion]:
    """Load TI files into tokenizers/TEs (token = file stem); return one token replacer per tokenizer."""
    replacers = [TokenExpansion() for _ in tokenizers]
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        vectors = _vectors_per_encoder(family, path)
        tokens = token_strings(stem, vectors[0].shape[0])
        for tok, te, vec, rep in zip(tokenizers, text_encoders, vectors, replacers):
            ids = _add_to_encoder(tok, te, tokens, vec, path)
            rep.expansions[ids[0]] = ids
        logger.info("textual inversion %s: token %r, %d vector(s)", path, stem, len(tokens))
    return replacers
