"""Run the WD14 tagger over a folder and write one caption file per image (spec utilities §2)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from library.tagging.image_batches import load_in_order, readable_batches
from library.errors import UserError
from library.fileio import write_text_atomic
from library.tagging import wd14
from library.tagging.image_list import glob_images
from library.tagging.tag_rules import (Labels, TagOptions, assemble_tags, merge_with_existing, prepare_labels,
                                       split_always_first, split_undesired)

logger = logging.getLogger(__name__)

Loaded = tuple[Path, "np.ndarray | None"]


def tag_options_from_args(args: argparse.Namespace) -> TagOptions:
    """Resolve the per-caption options; thresholds default to `--thresh`."""
    sep = args.caption_separator
    return TagOptions(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        caption_separator=sep,
        undesired_tags=split_undesired(args.undesired_tags, sep),
        character_tags_first=args.character_tags_first,
        use_rating_tags=args.use_rating_tags,
        use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag,
        always_first_tags=split_always_first(args.always_first_tags, sep),
    )


def _load_image(path: Path, size: int) -> Loaded:
    """Preprocessed image, or None (with one warning line) when the file cannot be decoded."""
    try:
        with Image.open(path) as image:
            return path, wd14.preprocess_image(image, size)
    except Exception as e:  # any decoder error: skip this file, keep tagging the others
        logger.warning(f"Could not load image, skipped: {path} ({e})")
        return path, None


def _iter_images(paths: list[Path], size: int, workers: int | None, chunk: int) -> Iterator[Loaded]:
    """Preprocessed images in path order (None when unreadable), see library.tagging.image_batches."""
    return load_in_order(paths, lambda p: _load_image(p, size), workers, chunk)


def _write_caption(image_path: Path, tags: list[str], opts: TagOptions, extension: str, append: bool) -> None:
    """`<image without ext><extension>`, UTF-8 with a trailing newline; `--append_tags` merges first."""
    caption_path = Path(os.path.splitext(image_path)[0] + extension)
    text = opts.caption_separator.join(tags)
    if append and caption_path.exists():
        try:
            existing = caption_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--append_tags: {caption_path} is not UTF-8 text: {e}") from e
        text = merge_with_existing(existing, tags, opts.caption_separator)
    write_text_atomic(caption_path, text + "\n")


def _check_output_size(tagger: wd14.Wd14Tagger, labels: Labels, csv_path: Path) -> None:
    """The model's label count must equal the CSV's rating+general+character rows (else tags shift)."""
    shape = tagger.session.get_outputs()[0].shape
    n_out = shape[-1] if shape else None
    if isinstance(n_out, int) and n_out != len(labels):
        raise UserError(f"the model outputs {n_out} labels but {csv_path} lists {len(labels)} rating/general/"
                        f"character tags: the two files do not belong together")


def print_frequencies(tag_freq: dict[str, int]) -> None:
    """`--frequency_tags` summary, most frequent first (ties keep first-seen order)."""
    print("Tag frequencies:")
    for tag, freq in sorted(tag_freq.items(), key=lambda x: x[1], reverse=True):
        print(f"{tag}: {freq}")


def run_tagger(args: argparse.Namespace) -> None:
    """Tag every image under `args.train_data_dir`; raise UserError if the folder, model or all images are bad."""
    # 1. inputs and options (checked before any model work)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    image_paths = glob_images(args.train_data_dir, args.recursive)
    logger.info(f"found {len(image_paths)} images.")
    opts = tag_options_from_args(args)

    # 2. model and labels
    location = wd14.ensure_model_files(args.model_dir, args.repo_id, args.force_download)
    labels = prepare_labels(wd14.load_labels(location / wd14.CSV_FILE), args.caption_separator,
                            args.character_tag_expand, args.remove_underscore, args.tag_replacement)
    tagger = wd14.Wd14Tagger(location / wd14.MODEL_FILE, args.batch_size)
    _check_output_size(tagger, labels, location / wd14.CSV_FILE)

    # 3. tag, batch by batch
    tag_freq: dict[str, int] = {}
    written = 0
    loaded = _iter_images(image_paths, tagger.image_size, args.max_data_loader_n_workers,
                          chunk=tagger.batch_size * max(1, args.max_data_loader_n_workers or 1) * 2)
    for batch in readable_batches(tqdm(loaded, total=len(image_paths), smoothing=0.0), tagger.batch_size):
        probs = tagger.predict(np.stack([image for _, image in batch]))
        for (path, _), prob in zip(batch, probs):
            result = assemble_tags(prob.tolist(), labels, opts, tag_freq)
            _write_caption(path, result.tags, opts, args.caption_extension, args.append_tags)
            written += 1
            if args.debug:
                logger.info(f"{path}:\n\tRating tags: {result.rating}\n\tCharacter tags: "
                            f"{args.caption_separator.join(result.character)}\n\tGeneral tags: "
                            f"{args.caption_separator.join(result.general)}")

    # 4. summary
    if args.frequency_tags:
        print_frequencies(tag_freq)
    failed = len(image_paths) - written
    if failed:
        logger.warning(f"{failed} of {len(image_paths)} images could not be read and were skipped")
        if written == 0:
            raise UserError(f"none of the {len(image_paths)} images in {args.train_data_dir} could be read")
    logger.info("done!")
