"""SDXL text-encoder output cache: encode each raw caption once, in memory or ``<image>_te_outputs.npz``.

spec dataset-config §10.1. The encoders are the caller's: ``encode_fn(captions: list[str])`` returns a
dict of arrays ``hidden_state1`` (B, L, 768), ``hidden_state2`` (B, L, 1280), ``pool2`` (B, 1280).
A cached batch then carries ``text_encoder_outputs1_list``/``text_encoder_outputs2_list``/
``text_encoder_pool2_list`` and ``input_ids`` None (§11).
"""
from __future__ import annotations

import logging
import os
import zipfile
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from library.errors import UserError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)

TE_OUTPUTS_SUFFIX = "_te_outputs.npz"
TE_KEYS = ("hidden_state1", "hidden_state2", "pool2")
TeEncodeFn = Callable[[list[str]], Mapping[str, "np.ndarray | torch.Tensor"]]


def caption_randomness(subset) -> list[str]:
    """Caption settings a cache would silently ignore (sd-scripts' ``is_text_encoder_output_cacheable``).

    ``caption_dropout_every_n_epochs`` is refused too (sd-scripts ignores it): it changes captions.
    """
    checks = {"shuffle_caption": subset.shuffle_caption, "caption_dropout_rate": subset.caption_dropout_rate > 0,
              "caption_dropout_every_n_epochs": subset.caption_dropout_every_n_epochs > 0,
              "caption_tag_dropout_rate": subset.caption_tag_dropout_rate > 0,
              "token_warmup_step": subset.token_warmup_step > 0}
    return [name for name, on in checks.items() if on]


def check_te_cacheable(subsets: Iterable) -> None:
    """``UserError`` naming the subset and setting that makes captions change between steps."""
    for subset in subsets:
        bad = caption_randomness(subset)
        if bad:
            raise UserError(f"text encoder outputs cannot be cached (--cache_text_encoder_outputs) with "
                            f"{', '.join(bad)} set: subset {subset.image_dir or subset.metadata_file}")


def load_te_outputs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hidden_state1, hidden_state2, pool2) from an ``_te_outputs.npz``."""
    try:
        with np.load(path) as npz:
            return tuple(npz[key] for key in TE_KEYS)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read text encoder output cache {path}: {e}") from None


def save_te_outputs(path: str, outputs: tuple) -> None:
    """Write float32 arrays through a temporary name and a rename."""
    arrays = {key: np.asarray(value, dtype=np.float32) for key, value in zip(TE_KEYS, outputs)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def cache_text_encoder_outputs(group, encode_fn: TeEncodeFn, to_disk: bool, is_main_process: bool = True,
                               batch_size: int | None = None, overwrite: bool = False,
                               suffix: str = TE_OUTPUTS_SUFFIX) -> None:
    """Encode the raw caption of every image (no prefix/suffix/processing, §10.1) once.

    On disk an existing file is reused without checks, as sd-scripts (``overwrite``: encoded again, as
    tools/cache_text_encoder_outputs.py does without ``--skip_existing``); in memory the arrays are kept
    on each ``ImageInfo``. ``batch_size`` defaults to each dataset's batch size; ``suffix``: the file name's end
    (another model family's outputs get their own files: FLUX.1 ``_flux_te_outputs.npz``).
    """
    for dataset in group.datasets:
        check_te_cacheable(dataset.subsets)
    for dataset in group.datasets:
        todo = []
        for info in dataset.images:
            if to_disk:
                info.te_outputs_npz = os.path.splitext(info.path)[0] + suffix
                if not is_main_process or (os.path.exists(info.te_outputs_npz) and not overwrite):
                    continue
            elif info.te_outputs is not None:
                continue
            todo.append(info)
        if to_disk and not is_main_process:
            continue
        size = batch_size or dataset.params.batch_size
        for start in tqdm(range(0, len(todo), size), desc="caching text encoder outputs", disable=not todo):
            chunk = todo[start:start + size]
            with torch.no_grad():
                out = encode_fn([info.caption for info in chunk])
            arrays = [_as_numpy(out[key]) for key in TE_KEYS]
            for i, info in enumerate(chunk):
                outputs = tuple(a[i] for a in arrays)
                if to_disk:
                    save_te_outputs(info.te_outputs_npz, outputs)
                else:
                    info.te_outputs = outputs
