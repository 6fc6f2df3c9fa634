"""Hold out a share of each subset's images for validation loss (docs/beyond-sd-scripts.md §1).

``validation_split`` / ``validation_seed`` are later sd-scripts' keys. The split is by image, before
repeats and regularization balancing, so an image is either trained on or validated on, never both:
each subset's images are sorted by key, shuffled by ``random.Random(validation_seed)``, and the first
``ceil(n * (1 - split))`` train (later sd-scripts' rule). Regularization subsets are never split.
Validation images get no augmentation, no caption randomness and one repeat, so every validation
pass sees the same batches.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random

from library.config.dataset_blueprint import SubsetParams
from library.data.discovery import SubsetImages

logger = logging.getLogger(__name__)

PARTS = ("train", "validation")

# what makes a sample random: off for validation, so the loss of an image is the same at every pass
_DETERMINISTIC = dict(flip_aug=False, color_aug=False, random_crop=False, face_crop_aug_range=None,
                      shuffle_caption=False, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                      caption_tag_dropout_rate=0.0, token_warmup_step=0, num_repeats=1)


def train_count(n: int, split: float) -> int:
    """How many of ``n`` images train: ``ceil(n * (1 - split))`` (rounded first: 10 * 0.7 is 7.000000000000001)."""
    return math.ceil(round(n * (1.0 - split), 9))


def split_keys(keys: list[str], split: float, seed: int) -> tuple[set[str], set[str]]:
    """(train keys, validation keys) of one subset: a pure function of the key set, split and seed."""
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    cut = train_count(len(order), split)
    return set(order[:cut]), set(order[cut:])


def select_part(subsets: list[SubsetParams], found: list[SubsetImages], part: str,
                run_seed: int | None) -> tuple[list[SubsetParams], list[SubsetImages]]:
    """Keep only ``part``'s images of every subset; drop subsets left empty and renumber ``info.subset``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    kept_subsets, kept_found = [], []
    for subset, images in zip(subsets, found):
        if subset.is_reg:
            if subset.validation_split:
                logger.warning("validation_split ignored for regularization subset %s", subset.image_dir)
            chosen = images.infos if part == "train" else []
        elif not subset.validation_split:
            chosen = images.infos if part == "train" else []
        else:
            seed = subset.validation_seed if subset.validation_seed is not None else (run_seed or 0)
            train, val = split_keys([i.key for i in images.infos], subset.validation_split, seed)
            keys = train if part == "train" else val
            chosen = [i for i in images.infos if i.key in keys]
        if not chosen:
            continue
        if part == "validation":
            subset = dataclasses.replace(subset, **_DETERMINISTIC)
            for info in chosen:
                info.num_repeats = 1
        for info in chosen:
            info.subset = len(kept_subsets)
        kept_subsets.append(subset)
        kept_found.append(dataclasses.replace(images, infos=chosen))
    return kept_subsets, kept_found


def wants_validation(subsets: list[SubsetParams]) -> bool:
    """Whether any non-regularization subset holds images out."""
    return any(s.validation_split > 0 and not s.is_reg for s in subsets)
