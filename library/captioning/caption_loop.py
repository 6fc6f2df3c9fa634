"""The captioning loop shared by BLIP and GIT: read images, caption them in batches, write one file each.

Spec utilities §1: `<image path without ext><caption_extension>`, UTF-8 with a trailing newline, overwritten.
Unreadable images are skipped with a warning (sd-scripts logs them too); if none can be read it is an error.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from tqdm import tqdm

from library.errors import UserError
from library.fileio import write_text_atomic
from library.tagging.image_batches import load_in_order, readable_batches

logger = logging.getLogger(__name__)

Loaded = tuple[Path, "Image.Image | None"]
CaptionFn = Callable[[list[Image.Image]], list[str]]


def load_rgb(path: Path) -> Loaded:
    """The image as RGB, or None (with one warning line) when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return path, image.convert("RGB")
    except Exception as e:  # any decoder error: skip this file, keep captioning the others
        logger.warning(f"Could not load image, skipped: {path} ({e})")
        return path, None


def iter_images(paths: list[Path], workers: int | None, chunk: int) -> Iterator[Loaded]:
    """Images in path order as RGB (None when unreadable); see library.tagging.image_batches."""
    return load_in_order(paths, load_rgb, workers, chunk)


def caption_path(image_path: Path, extension: str) -> Path:
    """`<image path without ext><extension>` (spec utilities §1)."""
    return Path(os.path.splitext(image_path)[0] + extension)


def check_batch_options(batch_size: int, workers: int | None) -> None:
    """Reject values that would loop forever or mean nothing, naming the option."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise UserError(f"--max_data_loader_n_workers must be 0 or more, got {workers}")


def caption_images(image_paths: list[Path], caption_batch: CaptionFn, extension: str, batch_size: int,
                   workers: int | None, debug: bool) -> int:
    """Caption every readable image and write its caption file; return how many were written.

    Raises UserError when images exist but none could be read (exit 2, nothing written).
    """
    written = 0
    chunk = batch_size * max(1, workers or 1) * 2
    loaded = iter_images(image_paths, workers, chunk)
    for batch in readable_batches(tqdm(loaded, total=len(image_paths), smoothing=0.0), batch_size):
        captions = caption_batch([image for _, image in batch])
        for (path, _), caption in zip(batch, captions):
            write_text_atomic(caption_path(path, extension), caption + "\n")
            written += 1
            if debug:
                logger.info(f"{path} {caption}")
    failed = len(image_paths) - written
    if failed:
        logger.warning(f"{failed} of {len(image_paths)} images could not be read and were skipped")
        if written == 0:
            raise UserError(f"none of the {len(image_paths)} images could be read")
    return written
