"""Textual Inversion tokens: new token strings, their ids and initial vectors, caption templates.

spec cli-options §12 (train_textual_inversion.py): tokens ``tok, tok1, … tok{n-1}`` are added to the
tokenizer (SDXL: to each of the two), must be new and contiguous at the end of the vocabulary; the text
encoder's embedding matrix grows to match; new rows start from ``--init_word``'s ids cycled, or from ``--weights``.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

# From the original Textual Inversion code, verbatim, duplicates included (spec cli-options §12).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)


def token_strings(token: str, num_vectors: int) -> list[str]:
    """``[tok, tok1, …, tok{n-1}]``."""
    return [token] + [f"{token}{i}" for i in range(1, num_vectors)]


def check_new(tokenizer, strings: list[str]) -> None:
    """The new tokens must not exist yet (SDXL checks both tokenizers before changing either)."""
    vocab = tokenizer.get_vocab()
    existing = [s for s in strings if s in vocab]
    if existing:
        raise UserError(f"--token_string: {', '.join(existing)} already exists in the tokenizer; choose another word")


def add_tokens(tokenizer, strings: list[str]) -> list[int]:
    """Add the new tokens; they must not exist yet and must get contiguous ids at the end of the vocabulary."""
    check_new(tokenizer, strings)
    added = tokenizer.add_tokens(strings)
    if added != len(strings):
        raise UserError(f"--token_string: only {added} of the tokens {strings} could be added to the tokenizer")
    ids = tokenizer.convert_tokens_to_ids(strings)
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[-1] != len(tokenizer) - 1:
        raise UserError(f"--token_string: the new token ids {ids} are not contiguous at the end of the vocabulary")
    return ids


def init_word_ids(tokenizer, init_word: Optional[str], num_vectors: int) -> Optional[list[int]]:
    """Ids of ``--init_word`` (no BOS/EOS); used cycled when there are fewer than ``num_vectors``."""
    if init_word is None:
        return None
    ids = tokenizer.encode(init_word, add_special_tokens=False)
    if not ids:
        raise UserError(f"--init_word {init_word!r} gives no tokens")
    if len(ids) > 1 and len(ids) != num_vectors:
        logger.warning("--init_word %r has %d tokens but --num_vectors_per_token is %d: ids are cycled",
                       init_word, len(ids), num_vectors)
    return ids


def grow_embeddings(text_encoder, tokenizer, token_ids: list[int], init_ids: Optional[list[int]],
                    weights: Optional[torch.Tensor]) -> None:
    """Resize the input embeddings to the tokenizer; set the new rows from ``init_ids`` or ``weights``."""
    # mean_resizing=False: new rows from the model's own initialiser, as transformers did for sd-scripts
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight.data
    if init_ids is not None:
        for i, token_id in enumerate(token_ids):
            table[token_id] = table[init_ids[i % len(init_ids)]]
    if weights is not None:
        if tuple(weights.shape) != (len(token_ids), table.shape[1]):
            raise UserError(f"--weights holds vectors of shape {tuple(weights.shape)}, expected "
                            f"({len(token_ids)}, {table.shape[1]}) for --num_vectors_per_token {len(token_ids)}")
        table[token_ids[0]:token_ids[-1] + 1] = weights.to(table.dtype)


def caption_replacement(strings: list[str], use_object_template: bool,
                        use_style_template: bool) -> tuple[Optional[tuple[str, object]], Optional[tuple[str, str]]]:
    """``(dataset replacement, sample-prompt replacement)``.

    Templates: every caption becomes a random template of the joined tokens (source ``""``). Otherwise, with
    several vectors, ``tok`` in captions and prompts becomes ``"tok tok1 … tok{n-1}"`` (spec §12 T).
    """
    joined = " ".join(strings)
    prompt = (strings[0], joined) if len(strings) > 1 else None
    if use_object_template or use_style_template:
        templates = OBJECT_TEMPLATES if use_object_template else STYLE_TEMPLATES
        return ("", [t.format(joined) for t in templates]), prompt
    return (prompt if prompt else None), prompt
