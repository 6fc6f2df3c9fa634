"""FLUX.1 prompt encoding: CLIP-L pooled vector + T5-XXL token states (sd-scripts' ``FluxTokenizeStrategy`` /
``FluxTextEncodingStrategy``).

CLIP-L: 77 tokens, padded, truncated; its pooled output is the transformer's ``pooled_projections``.
T5: ``--t5xxl_max_token_length`` tokens (sd-scripts: 512 for dev, 256 for schnell), padded to that length,
truncated; with ``--apply_t5_attn_mask`` the encoder (and later the transformer) ignore the padding.
Prompts are used as written: no ``(word:1.2)`` weighting and no 75-token chunks (sd-scripts' FLUX code has none).
"""
from __future__ import annotations

from typing import Sequence

import torch

from library.sampling.flux_sampling import FluxConditioning

CLIP_MAX_LENGTH = 77
T5_DEFAULT_LENGTH = {"dev": 512, "schnell": 256}


def t5_max_length(option: int | None, model_name: str) -> int:
    """``--t5xxl_max_token_length``, else sd-scripts' default for ``model_name`` (dev / schnell)."""
    return option if option is not None else T5_DEFAULT_LENGTH[model_name]


def encode_flux_prompts(clip_l: torch.nn.Module, t5xxl: torch.nn.Module, tokenizers: Sequence,
                        prompts: Sequence[str], max_length: int, apply_t5_attn_mask: bool) -> FluxConditioning:
    """Encode ``prompts`` together; ``tokenizers`` is [CLIP-L tokenizer, T5 tokenizer]."""
    clip_tok, t5_tok = tokenizers
    prompts = list(prompts)
    clip_ids = clip_tok(prompts, max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids
    t5_tokens = t5_tok(prompts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    pooled = clip_l(clip_ids.to(clip_l.device)).pooler_output
    mask = t5_tokens.attention_mask.to(t5xxl.device) if apply_t5_attn_mask else None
    t5_out = t5xxl(t5_tokens.input_ids.to(t5xxl.device), attention_mask=mask).last_hidden_state
    return FluxConditioning(pooled=pooled, t5=t5_out, t5_mask=mask)
