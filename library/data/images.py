"""Image files: discovery, header sizes, decoding to uint8 arrays, up-front validation.

spec dataset-config §4.1 (extensions, globbing) and §7.4 (RGB uint8 input to the bucket crop).
"""
from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from library.data.integrity import looks_complete
from library.errors import UserError

_BASE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]

# EXIF orientation -> the transpose that makes the pixels upright (as PIL.ImageOps.exif_transpose)
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
MAX_LISTED_BAD_FILES = 5
# what Pillow raises for a corrupt, truncated or absurdly large file (the bomb error is no OSError)
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def image_extensions() -> list[str]:
    """Accepted extensions, lower and upper case; avif/jxl only with their plug-ins (spec §4.1)."""
    extensions = list(_BASE_EXTENSIONS)
    if importlib.util.find_spec("pillow_avif") is not None:
        extensions.append(".avif")
    if importlib.util.find_spec("jxlpy") is not None or importlib.util.find_spec("pillow_jxl") is not None:
        extensions.append(".jxl")
    return extensions + [e.upper() for e in extensions]


def _has_image_extension(name: str, extensions: list[str]) -> bool:
    # hidden files are skipped, as glob("*.png") skips them in sd-scripts
    return not name.startswith(".") and any(name.endswith(e) for e in extensions)


def glob_images(directory: str, recursive: bool = False) -> list[str]:
    """Image files in ``directory`` (optionally below it), de-duplicated and sorted (spec §4.1).

    Paths are ``os.path.join(directory, name)``, the same strings sd-scripts' glob returns, so they
    match the keys of an existing ``metadata_cache.json``. Matching is case-sensitive on the exact
    lower- or upper-case extension, as globbing on Linux is.
    """
    extensions = image_extensions()
    found: set[str] = set()
    if recursive:
        for root, dirs, files in os.walk(directory):
            dirs.sort()
            found.update(os.path.join(root, f) for f in files if _has_image_extension(f, extensions))
        # pathlib orders by path components (sd-scripts' glob_images_pathlib)
        return sorted(found, key=lambda p: p.split(os.sep))
    with os.scandir(directory) as entries:
        for entry in entries:
            if _has_image_extension(entry.name, extensions) and entry.is_file():
                found.add(os.path.join(directory, entry.name))
    return sorted(found)


def find_images_for_key(image_dir: str, key: str) -> list[str]:
    """Images named ``<image_dir>/<key><ext>`` (fine-tuning key lookup, spec dataset-config §5)."""
    base = os.path.join(image_dir, key)
    return sorted({base + ext for ext in image_extensions() if os.path.isfile(base + ext)})


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation (1-8) readable from the header alone; 1 when absent."""
    if image.format == "PNG" and "exif" not in image.info:
        # an eXIf chunk after the pixel data needs a full decode to find: ignored on both the
        # size and the decode path so the two always agree
        return 1
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a malformed EXIF block must not make a good image unreadable
        return 1


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the file header without decoding pixels.

    The file's end is checked too (``integrity.looks_complete``, a few bytes): a file that does not
    end where its format says is decoded once, as training would, so a truncated file is a
    ``UserError`` here rather than in a DataLoader worker, and a file with a trailer still passes.
    """
    try:
        # Pillow's lazy open reads headers only; its size is the one the decode will have, and the
        # rotation follows exif_orientation() as load_image does, so sizes and pixels always agree
        with open(path, "rb") as f, Image.open(f) as image:
            width, height = image.size
            if exif_orientation(image) in _SWAPS_AXES:
                width, height = height, width
            complete = looks_complete(image.format, f)
    except _DECODE_ERRORS as e:
        raise UserError(f"cannot read image {path}: {_reason(e, path)}") from None
    if not complete:
        load_image(path)  # raises, naming the file, exactly when training's decode would
    return int(width), int(height)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer grey to 8 bits by scaling; Pillow's own convert clips at 255."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" or values.max(initial=0) <= 255:
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), "L")


def load_image(path: str, alpha: bool = False) -> np.ndarray:
    """Decode to an upright (H, W, 3) RGB or (H, W, 4) RGBA uint8 array (spec dataset-config §7.4)."""
    try:
        with Image.open(path) as image:
            orientation = exif_orientation(image)
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                image = _to_8bit(image)
            target = "RGBA" if alpha else "RGB"
            if image.mode != target:
                image = image.convert(target)  # alpha dropped without compositing, as sd-scripts
            if orientation in _ORIENTATION_TRANSPOSE:
                image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
            return np.array(image, dtype=np.uint8)
    except _DECODE_ERRORS as e:
        raise UserError(f"cannot read image {path}: {_reason(e, path)}") from None


def _reason(error: BaseException, path: str) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return error.strerror  # "No such file or directory", without repeating the path
    text = str(error) or type(error).__name__
    return text.replace(f" '{path}'", "").replace(f" {path}", "")


def bad_files_error(bad: list[str], what: str = "unreadable", hint: str = "") -> UserError:
    """One error line naming the first few bad files, how many more, and what to do (``hint``)."""
    listed = "; ".join(bad[:MAX_LISTED_BAD_FILES])
    more = f" and {len(bad) - MAX_LISTED_BAD_FILES} more" if len(bad) > MAX_LISTED_BAD_FILES else ""
    noun = "image" if len(bad) == 1 else "images"
    return UserError(f"{len(bad)} {what} {noun}, first: {listed}{more}" + (f"; {hint}" if hint else ""))


def bad_file_entry(path: str, error: UserError) -> str:
    """``"<path> (<reason>)"`` from the error ``read_image_size`` / ``load_image`` raised for ``path``."""
    return f"{path} ({str(error).removeprefix(f'cannot read image {path}: ')})"


def _decoded_size(path: str) -> tuple[int, int] | str:
    """Upright (width, height) of the decoded image, or what went wrong (``bad_file_entry``)."""
    try:
        pixels = load_image(path)
    except UserError as e:
        return bad_file_entry(path, e)
    return pixels.shape[1], pixels.shape[0]


def scan_images(paths: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Decode every image as training will (``--verify_images``); one UserError lists the bad files.

    Returns each image's upright (width, height). A full decode per file is slow, but it also finds
    what no header or end-marker check can: corrupt compressed data in the middle of a file.
    """
    paths = list(paths)
    # threads overlap file reads and codec work (a thread keeps running while another decodes)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_decoded_size, paths))
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        raise bad_files_error(bad)
    return dict(zip(paths, results))
