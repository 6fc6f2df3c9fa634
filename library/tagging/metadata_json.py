"""Fine-tuning metadata JSON: read, merge caption/tag files into it, write (spec utilities §3-§4,
dataset-config §5)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from library.errors import UserError
from library.fileio import write_text_atomic
from library.tagging.image_list import glob_images

logger = logging.getLogger(__name__)


def read_metadata(path: str | Path) -> dict:
    """Load a metadata JSON object; a missing or malformed file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metadata file not found: {path}")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"metadata file {path} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise UserError(f"metadata file {path} must hold a JSON object keyed by image, got {type(metadata).__name__}")
    return metadata


def write_metadata(path: str | Path, metadata: dict) -> None:
    """`json.dump(indent=2)` (ASCII-escaped, as sd-scripts), written atomically."""
    logger.info(f"writing metadata: {path}")
    write_text_atomic(path, json.dumps(metadata, indent=2))


def image_key(image_path: Path, full_path: bool) -> str:
    """Key = the image path as globbed (`--full_path`; relative if the folder was given relative) or its stem."""
    return str(image_path) if full_path else image_path.stem


def sidecar_path(image_path: Path, extension: str) -> Path:
    """`<image with its suffix replaced by extension>`; the extension must start with a dot."""
    try:
        return image_path.with_suffix(extension)
    except ValueError as e:
        raise UserError(f"invalid --caption_extension {extension!r}: it must start with '.', e.g. '.txt'") from e


def read_sidecars(image_paths: list[Path], extension: str) -> list[str]:
    """Each image's sidecar text, stripped (inner newlines kept). All must exist: otherwise one UserError
    naming the first missing file and the count, before anything is written (sd-scripts crashes instead)."""
    paths = [sidecar_path(p, extension) for p in image_paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} images have no {extension} file, first: {missing[0]}; "
                        f"nothing written")
    texts = []
    for p in tqdm(paths):
        try:
            texts.append(p.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as e:
            raise UserError(f"{p} is not UTF-8 text: {e}") from e
    return texts


def merge_sidecars_into_metadata(train_data_dir: str, out_json: str, in_json: str | None, field: str,
                                 extension: str, full_path: bool, recursive: bool, debug: bool) -> None:
    """Set `metadata[key][field]` from each image's sidecar file, overwriting; spec §3 (caption) / §4 (tags).

    Without `in_json` an existing `out_json` is read and updated.
    """
    if recursive and not full_path:
        raise UserError("--recursive requires --full_path (stems from different folders could collide)")
    image_paths = glob_images(train_data_dir, recursive)
    logger.info(f"found {len(image_paths)} images.")
    if in_json is None and Path(out_json).is_file():
        in_json = out_json
    if in_json is not None:
        logger.info(f"loading existing metadata: {in_json}")
        metadata = read_metadata(in_json)
        logger.info(f"{field} for existing images will be overwritten")
    else:
        logger.info("new metadata will be created")
        metadata = {}

    texts = read_sidecars(image_paths, extension)
    for image_path, text in zip(image_paths, texts):
        key = image_key(image_path, full_path)
        metadata.setdefault(key, {})[field] = text
        if debug:
            logger.info(f"{key} {text}")
    write_metadata(out_json, metadata)
    logger.info("done!")
