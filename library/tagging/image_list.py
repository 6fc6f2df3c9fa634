"""Image discovery for the finetune tools (spec utilities: `glob_images_pathlib`, dataset-config §4.1).

A small local copy on purpose: these scripts only need the extension list and the glob order, not
the training dataset machinery in ``library/data``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from library.errors import UserError

_BASE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]


def image_extensions() -> list[str]:
    """Training image extensions with their upper-case variants; `.avif`/`.jxl` only when a plugin exists."""
    exts = list(_BASE_EXTENSIONS)
    if importlib.util.find_spec("pillow_avif") is not None:
        exts.append(".avif")
    if any(importlib.util.find_spec(m) is not None for m in ("jxlpy", "pillow_jxl")):
        exts.append(".jxl")
    return exts + [e.upper() for e in exts]


def glob_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Images directly in ``folder`` (or below it with ``recursive``), de-duplicated and sorted.

    Extensions match case-sensitively against the list (`.PNG` yes, `.Png` no), as sd-scripts' globs do.
    A missing folder is a ``UserError`` (sd-scripts silently finds 0 images).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    exts = set(image_extensions())
    candidates = folder.rglob("*") if recursive else folder.glob("*")
    return sorted({p for p in candidates if p.suffix in exts and p.is_file()})
