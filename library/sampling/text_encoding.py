"""Prompt -> U-Net text conditioning with prompt weighting and long prompts (spec generation §5).

One encoder for gen_img (`encode_prompts`: PAD padding, BREAK, clip_skip per §5.4) and for the training
sample images (`encode_for_training_samples`: the LPW pipelines' semantics). The tokenisation and chunk
layout come from `prompt_weighting` / `long_prompts`; this module only runs the text encoders.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from library.formats.long_prompts import chunk_weights, split_into_chunks
from library.formats.prompt_weighting import TokenReplacer, apply_weights, tokenize_weighted

logger = logging.getLogger(__name__)

# gen_img.py's clip_skip defaults (spec §1.1). SD2 = 2 is upstream's default although the loaded SD2 TE already
# ends at the penultimate layer (spec pitfall 5): kept for drop-in compatibility, documented in docs/gen_img.md.
GEN_IMG_CLIP_SKIP = {"sd1": 1, "sd2": 2, "sdxl": 2}
# training sample images: the trainer's `--clip_skip` None means the last layer for SD1/2; SDXL is penultimate
TRAINING_CLIP_SKIP = {"sd1": 1, "sd2": 1, "sdxl": 2}
# the LPW pipelines used for training samples encode up to 3 chunks (225 tokens), spec §4
TRAINING_MAX_EMBEDDINGS_MULTIPLES = 3


@dataclass
class PromptEmbeddings:
    """Encoded prompts: context (B, 77n, D) and, for SDXL, TE2's projected pooled output (B, P)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, index: slice | list[int]) -> "PromptEmbeddings":
        """Rows `index` of both tensors (e.g. the negatives of a joint encode)."""
        return PromptEmbeddings(self.context[index], None if self.pooled is None else self.pooled[index])


def default_clip_skip(family: str, clip_skip: int | None, for_training: bool = False) -> int:
    """`--clip_skip` or the family default of gen_img / training samples. spec §1.1, §5.4."""
    if clip_skip is not None:
        return clip_skip
    return (TRAINING_CLIP_SKIP if for_training else GEN_IMG_CLIP_SKIP)[family]


def text_module(te: torch.nn.Module) -> torch.nn.Module:
    """The CLIP text transformer of a text encoder, also when it comes wrapped by DDP (trained in training)."""
    te = getattr(te, "module", te)
    # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`); WithProjection keeps it
    return getattr(te, "text_model", te)


def _encode_chunks(te: torch.nn.Module, rows: torch.Tensor, clip_skip: int, final_ln: bool,
                   want_pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, 77) ids -> hidden states (N, 77, D) at `hidden_states[-clip_skip]` (+ final LN), pooled if asked.

    `te` is called as given (a DDP wrapper keeps its gradient hooks); only the device is read from the module.
    """
    out = te(rows.to(getattr(te, "module", te).device), output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    if final_ln:
        # skip 1 + LN equals last_hidden_state: the last layer's output goes through the same LN
        hidden = text_module(te).final_layer_norm(hidden)
    # CLIPTextModelWithProjection: text_projection of the final-LN state at the EOS (first highest id)
    pooled = out.text_embeds if want_pooled else None
    return hidden, pooled


def encode_with_encoder(te: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, clip_skip: int,
                        final_ln: bool, max_embeddings_multiples: int | None, pad_with: str, break_isolation: bool,
                        emb_normalize_mode: str, token_replacer: TokenReplacer | None = None,
                        want_pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All prompts through one tokenizer/TE pair with weighting; one common chunk count. spec §5.2-5.4.

    Returns context (B, 77n, D) and the pooled output of each prompt's first chunk (when `want_pooled`).
    """
    ids, weights = tokenize_weighted(tokenizer, prompts, max_embeddings_multiples, pad_with=pad_with,
                                     break_isolation=break_isolation, token_replacer=token_replacer)
    pad = tokenizer.pad_token_id if pad_with == "pad" else tokenizer.eos_token_id
    rows = [split_into_chunks(x, pad, tokenizer.eos_token_id, tokenizer.bos_token_id) for x in ids]
    n_chunks = len(rows[0])
    flat = torch.tensor([r for prompt_rows in rows for r in prompt_rows], dtype=torch.long)
    hidden, pooled = _encode_chunks(te, flat, clip_skip, final_ln, want_pooled)
    b = len(prompts)
    hidden = hidden.reshape(b, n_chunks * hidden.shape[1], hidden.shape[-1])
    w = torch.tensor([sum(chunk_weights(x), []) for x in weights], dtype=torch.float32)
    if not bool((w == 1.0).all()):
        hidden = apply_weights(hidden, w, emb_normalize_mode)
    if pooled is not None:
        pooled = pooled.reshape(b, n_chunks, -1)[:, 0]  # spec §5.2: pooled from TE2's first chunk
    return hidden, pooled


def encode_prompts(family: str, text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any],
                   prompts: Sequence[str], *, clip_skip: int | None = None,
                   max_embeddings_multiples: int | None = None, emb_normalize_mode: str = "original",
                   token_replacers: Sequence[TokenReplacer | None] | None = None, pad_with: str = "pad",
                   break_isolation: bool = True) -> PromptEmbeddings:
    """gen_img's encoder: prompts (positives and negatives together) -> conditioning. spec §5.

    SD1/2: `hidden_states[-clip_skip]` + final LN. SDXL: TE1 and TE2 at `hidden_states[-clip_skip]` without
    final LN, concatenated on features; pooled = TE2's projection of the first chunk. Weights are applied per
    encoder (as upstream), skipped when every weight is 1.0 (`(x:1.0)` then equals `x` exactly).
    """
    skip = default_clip_skip(family, clip_skip)
    replacers = list(token_replacers or [None] * len(text_encoders))
    common = dict(clip_skip=skip, max_embeddings_multiples=max_embeddings_multiples, pad_with=pad_with,
                  break_isolation=break_isolation, emb_normalize_mode=emb_normalize_mode)
    if family != "sdxl":
        ctx, _ = encode_with_encoder(text_encoders[0], tokenizers[0], prompts, final_ln=True,
                                     token_replacer=replacers[0], **common)
        return PromptEmbeddings(ctx)
    h1, _ = encode_with_encoder(text_encoders[0], tokenizers[0], prompts, final_ln=False,
                                token_replacer=replacers[0], **common)
    h2, pooled = encode_with_encoder(text_encoders[1], tokenizers[1], prompts, final_ln=False,
                                     token_replacer=replacers[1], want_pooled=True, **common)
    # both tokenizers share CLIP's BPE vocabulary, so they give the same token counts and chunk counts
    return PromptEmbeddings(torch.cat([h1, h2.to(h1.device)], dim=-1), pooled)


def encode_for_training_samples(family: str, text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any],
                                prompts: Sequence[str], clip_skip: int | None = None,
                                token_replacers: Sequence[TokenReplacer | None] | None = None) -> PromptEmbeddings:
    """Training sample images: the LPW pipelines' encoder. spec §4, §5.

    `max_embeddings_multiples=3` (225 tokens), weighting mode `original`, no BREAK isolation; SD1/2 pad with
    EOS (their LPW pipeline), SDXL with PAD (its LPW variant).
    """
    skip = default_clip_skip(family, clip_skip, for_training=True)
    return encode_prompts(family, text_encoders, tokenizers, prompts, clip_skip=skip,
                          max_embeddings_multiples=TRAINING_MAX_EMBEDDINGS_MULTIPLES, emb_normalize_mode="original",
                          token_replacers=token_replacers, pad_with="pad" if family == "sdxl" else "eos",
                          break_isolation=False)
