"""Offline T5 tokenizer for FLUX (sd-scripts: ``google/t5-v1_1-xxl``, ``T5TokenizerFast``).

Nothing here needs the hub when a local copy exists. The tokenizer comes from, in order: a Diffusers FLUX
folder's ``tokenizer_2/``; the ``--t5xxl`` folder (a transformers T5 folder holding its tokenizer, or a
Diffusers FLUX folder); sd-scripts' ``--tokenizer_cache_dir`` layout (``<dir>/google_t5-v1_1-xxl``); the
hub only when not offline (then saved to the cache folder, as sd-scripts does). A folder needs
``tokenizer.json``; ``spiece.model`` alone needs the ``sentencepiece`` package to be converted.

``build_unigram_t5_tokenizer`` makes a T5 tokenizer from a Unigram vocabulary (tiny test models): the
tokenizers library, no SentencePiece model file and no hub.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from transformers import T5TokenizerFast

from library.errors import UserError
from library.fileio import atomic_path

from .flux_config import T5_TOKENIZER_HUB_ID

logger = logging.getLogger(__name__)

_FILES = ("tokenizer.json", "spiece.model")
SPECIALS = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # ids 0, 1, 2 as in T5's SentencePiece model


def _tokenizer_folder(path: str | None) -> str | None:
    """``path`` itself, or its ``tokenizer_2/`` / ``tokenizer/``, when it holds T5 tokenizer files."""
    if not path or not os.path.isdir(path):
        return None
    for sub in ("tokenizer_2", "tokenizer", ""):
        folder = Path(path) / sub
        if any((folder / f).is_file() for f in _FILES) and _is_t5_folder(folder):
            return str(folder)
    return None


def _is_t5_folder(folder: Path) -> bool:
    # a CLIP tokenizer folder has vocab.json + merges.txt; T5 has spiece.model or a Unigram tokenizer.json
    return (folder / "spiece.model").is_file() or not (folder / "merges.txt").is_file()


def read_t5_tokenizer(folder: str) -> T5TokenizerFast:
    if not (Path(folder) / "tokenizer.json").is_file() and importlib.util.find_spec("sentencepiece") is None:
        # transformers would fall back to other readers and report a missing `tiktoken` instead
        raise UserError(f"{folder}: the T5 tokenizer has spiece.model but no tokenizer.json; reading spiece.model "
                        "needs: pip install sentencepiece protobuf")
    try:
        return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, ImportError...)
        raise UserError(f"cannot read the T5 tokenizer folder {folder}: {str(e).splitlines()[0][:200]}") from None


def load_t5_tokenizer(model_path: str | None = None, t5xxl: str | None = None,
                      tokenizer_cache_dir: str | None = None) -> T5TokenizerFast:
    """The T5 tokenizer from the first local source (module doc); a clear error naming them all otherwise."""
    for source in (model_path, t5xxl):
        folder = _tokenizer_folder(source)
        if folder:
            logger.info("T5 tokenizer from %s", folder)
            return read_t5_tokenizer(folder)
    cached = os.path.join(tokenizer_cache_dir, T5_TOKENIZER_HUB_ID.replace("/", "_")) if tokenizer_cache_dir else None
    if cached and os.path.isdir(cached):
        logger.info("T5 tokenizer from the cache: %s", cached)
        return read_t5_tokenizer(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no"):
        try:
            tok = T5TokenizerFast.from_pretrained(T5_TOKENIZER_HUB_ID)
        except Exception:  # no network, no such repo: the offline message below says what to do
            tok = None
        if tok is not None:
            if cached:
                _save_cache(tok, cached)
            return tok
    raise UserError(
        "no T5 tokenizer found: give a Diffusers FLUX folder (tokenizer_2/), a --t5xxl folder holding the "
        f"tokenizer, or --tokenizer_cache_dir with a {T5_TOKENIZER_HUB_ID.replace('/', '_')} folder "
        "(tokenizer.json); the hub is not used offline")


def _save_cache(tok: T5TokenizerFast, folder: str) -> None:
    try:
        with atomic_path(folder) as tmp:
            tok.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"cannot write the tokenizer cache folder {folder}: {e}") from e
    logger.info("T5 tokenizer saved to the cache: %s", folder)


def build_unigram_t5_tokenizer(pieces: list[tuple[str, float]], extra_ids: int = 100,
                               model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer over ``pieces`` (SentencePiece-style "▁word" pieces with log-probabilities).

    Pad, EOS and UNK take ids 0, 1, 2 and ``extra_ids`` sentinel tokens ``<extra_id_N>`` follow, as in T5.
    """
    vocab = SPECIALS + [p for p in pieces if p[0] not in dict(SPECIALS)]
    return T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, model_max_length=model_max_length)
