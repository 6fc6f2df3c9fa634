"""Text conditioning for training: caption ids -> U-Net inputs (spec losses-and-noise §9).

SD1/SD2: last hidden state, or ``hidden_states[-clip_skip]`` + final layer norm; long captions are
re-joined. SDXL: TE1 ``hidden_states[11]`` (= [-2]) and TE2 ``hidden_states[-2]`` (no final LN) concatenated,
TE2's projected pooled output of the first chunk, and the size/crop ids the U-Net embeds itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from library.errors import UserError
from library.formats.long_prompts import CHUNK_TOKENS, join_chunked_hidden_states
from library.sampling.text_encoding import encode_with_encoder, text_module


@dataclass
class TextConditioning:
    """What the U-Net needs besides the noisy latents and timesteps."""

    context: torch.Tensor  # (B, T, D)
    added_cond_kwargs: Optional[dict] = None  # SDXL: text_embeds (pooled) and time_ids


def _device(te) -> torch.device:
    """The encoder's device; a trained one may come wrapped by DDP, which has no ``device``."""
    return getattr(te, "module", te).device


def encode_sd(te, input_ids: torch.Tensor, clip_skip: Optional[int], max_token_length: Optional[int]) -> torch.Tensor:
    """SD1/SD2 hidden states of (B, n, 77) ids, spec §9."""
    b, n, length = input_ids.shape
    ids = input_ids.reshape(b * n, length).to(_device(te))
    if clip_skip is None or clip_skip <= 1:
        h = te(ids)[0]
    else:
        h = te(ids, output_hidden_states=True).hidden_states[-clip_skip]
        h = text_module(te).final_layer_norm(h)  # a trained TE may come wrapped by DDP (train_db, TI)
    h = h.reshape(b, n * length, h.shape[-1])
    return join_chunked_hidden_states(h, max_token_length) if max_token_length else h


def encode_sd_weighted(te, tokenizer, captions: Sequence[str], clip_skip: Optional[int],
                       max_token_length: Optional[int]) -> torch.Tensor:
    """SD1/SD2 ``--weighted_captions``: ``(tag:1.2)`` captions through the prompt-weighting encoder, spec §9.

    The LPW pipelines' encoder of generation §5 in ``original`` mode: weights parsed without BREAK handling,
    chunks of 75 tokens padded with EOS, at most ``max_token_length // 75`` chunks (1 without it) and as many
    as the batch's longest caption needs; each chunk encoded on its own and concatenated (B, 77n, D), no
    re-joining; ``clip_skip`` as in plain training; ``E * w`` rescaled to the caption's original mean.
    """
    multiples = max_token_length // CHUNK_TOKENS if max_token_length else 1
    skip = clip_skip if clip_skip is not None and clip_skip > 1 else 1
    ctx, _ = encode_with_encoder(te, tokenizer, captions, clip_skip=skip, final_ln=True,
                                 max_embeddings_multiples=multiples, pad_with="eos", break_isolation=False,
                                 emb_normalize_mode="original")
    return ctx


def encode_sdxl(te1, te2, ids1: torch.Tensor, ids2: torch.Tensor,
                max_token_length: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL context (B, T, D1+D2) and pooled embedding (B, P), spec §9."""
    b, n, length = ids1.shape
    flat1 = ids1.reshape(b * n, length).to(_device(te1))
    flat2 = ids2.reshape(b * n, length).to(_device(te2))
    # sd-scripts writes hidden_states[11]: for the real 12-layer TE1 that is the penultimate layer, which
    # [-2] names for any depth (tiny test models have fewer layers)
    h1 = te1(flat1, output_hidden_states=True).hidden_states[-2]
    out2 = te2(flat2, output_hidden_states=True)
    h2 = out2.hidden_states[-2]
    # pooled output of the first chunk of each caption (eos_token_id 2: transformers takes argmax = EOS)
    pool = out2.text_embeds.reshape(b, n, -1)[:, 0]
    h1 = h1.reshape(b, n * length, -1)
    h2 = h2.reshape(b, n * length, -1)
    if max_token_length:
        h1, h2 = join_chunked_hidden_states(h1, max_token_length), join_chunked_hidden_states(h2, max_token_length)
    return torch.cat([h1, h2], dim=-1), pool


def sdxl_time_ids(batch: Mapping[str, Any], device, dtype) -> torch.Tensor:
    """(orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample, spec §9 / dataset §7.4."""
    return torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1).to(device, dtype)


def weighted_captions_tokenizer(models, weighted_captions: bool) -> Any:
    """The tokenizer for ``encode_sd_weighted`` when ``--weighted_captions`` is on (SD1/SD2), else None."""
    if not weighted_captions:
        return None
    if models.family == "sdxl":  # the SDXL trainer refuses the option up front (spec cli-options §11)
        raise UserError("--weighted_captions is not supported for SDXL")
    return models.tokenizers[0]


def text_conditioning(family: str, text_encoders: list, batch: Mapping[str, Any], *, clip_skip: Optional[int],
                      max_token_length: Optional[int], device, dtype,
                      weighted_tokenizer: Any = None) -> TextConditioning:
    """U-Net conditioning for a batch (cached TE outputs are used when the batch carries them).

    ``weighted_tokenizer`` (SD1/SD2 ``--weighted_captions``): encode the batch's processed captions with
    their ``(tag:w)`` weights instead of its token ids.
    """
    if family != "sdxl":
        if weighted_tokenizer is not None:
            ctx = encode_sd_weighted(text_encoders[0], weighted_tokenizer, batch["captions"], clip_skip,
                                     max_token_length)
        else:
            ctx = encode_sd(text_encoders[0], batch["input_ids"], clip_skip, max_token_length)
        return TextConditioning(ctx.to(dtype))
    if batch.get("text_encoder_outputs1_list") is not None:
        h1, h2 = batch["text_encoder_outputs1_list"], batch["text_encoder_outputs2_list"]
        ctx, pool = torch.cat([h1, h2], dim=-1).to(device), batch["text_encoder_pool2_list"].to(device)
    else:
        ctx, pool = encode_sdxl(text_encoders[0], text_encoders[1], batch["input_ids"], batch["input_ids2"],
                                max_token_length)
    added = {"text_embeds": pool.to(dtype), "time_ids": sdxl_time_ids(batch, device, dtype)}
    return TextConditioning(ctx.to(dtype), added)
