"""Caption sources: caption files next to images, fine-tuning metadata entries, tag frequency.

spec dataset-config §4.1 (caption files, tag frequency) and §5 (metadata caption assembly).
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

from library.errors import UserError


def normalize_caption_extension(extension: str) -> str:
    """``txt`` -> ``.txt``: sd-scripts adds the missing dot (spec dataset-config §4.1)."""
    if extension and not extension.startswith("."):
        return "." + extension
    return extension


def caption_candidates(image_path: str, caption_extension: str) -> list[str]:
    """Caption file names to try, in order: ``<stem><ext>``, then the face-crop stem (spec §4.1)."""
    caption_extension = normalize_caption_extension(caption_extension)
    base = os.path.splitext(image_path)[0]
    # face-crop files are <name>_<cx>_<cy>_<w>_<h>; the whole path is split, as sd-scripts does,
    # so underscores in folder names count too
    pieces = base.split("_")
    face_base = "_".join(pieces[:-4]) if len(pieces) >= 5 else base
    return [base + caption_extension, face_base + caption_extension]


def read_caption_file(path: str, enable_wildcard: bool = False) -> str:
    """First stripped line, or with wildcards all non-empty stripped lines joined by ``\\n`` (spec §4.1)."""
    try:
        with open(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UserError(f"caption file is not UTF-8 text: {path} ({e.reason} at byte {e.start})") from None
    if not lines:
        raise UserError(f"caption file is empty: {path}")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def find_caption(image_path: str, caption_extension: str, enable_wildcard: bool = False) -> str | None:
    """The caption of an image from its caption file, or None when no file exists (spec §4.1)."""
    for path in caption_candidates(image_path, caption_extension):
        if os.path.isfile(path):
            return read_caption_file(path, enable_wildcard)
    return None


def metadata_caption(entry: Mapping, caption_separator: str = ",",
                     enable_wildcard: bool = False) -> tuple[str, str | None]:
    """Caption of one fine-tuning metadata entry, and the tags counted for frequency (spec §5).

    The second value is the tag string sd-scripts counts in ``ss_tag_frequency`` (only when tags
    were appended without wildcards), else None.
    """
    caption = entry.get("caption")
    tags = entry.get("tags")
    if caption is None:
        caption, tags = tags, None  # tags alone become the caption (may be multi-line)
    counted = None
    if enable_wildcard:
        if tags is not None:
            tags = tags.replace("\n", caption_separator)  # tags must be one line
        if caption is not None and tags is not None:
            caption = "\n".join(f"{line}{caption_separator}{tags}"
                                for line in caption.split("\n") if line.strip() != "")
    elif tags:
        caption = caption + caption_separator + tags  # no space added
        counted = tags
    return ("" if caption is None else caption), counted


def count_tags(captions: Iterable[str], frequency: dict[str, int] | None = None) -> dict[str, int]:
    """Tag counts: split on ``,``, strip, lower-case, skip empty (spec dataset-config §4.1)."""
    frequency = {} if frequency is None else frequency
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                frequency[tag] = frequency.get(tag, 0) + 1
    return frequency


def add_tag_frequency(tag_frequency: dict[str, dict[str, int]], dir_name: str,
                      captions: Iterable[str]) -> None:
    """Add counts under ``dir_name`` (folder or metadata file basename) for ``ss_tag_frequency``."""
    tag_frequency[dir_name] = count_tags(captions, tag_frequency.get(dir_name, {}))
