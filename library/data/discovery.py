"""Finding a subset's images and captions: DreamBooth folders, fine-tuning metadata, ControlNet pairs.

spec dataset-config §4.1 (images, captions), §4.2 (``metadata_cache.json``), §5 (metadata JSON),
§6 (conditioning images). Sizes are read later, in bulk (``image_info.read_sizes``).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from library.config.dataset_blueprint import SubsetParams
from library.data.caption_files import caption_candidates, metadata_caption, read_caption_file
from library.data.image_info import ImageInfo
from library.data.images import glob_images, image_extensions
from library.errors import UserError
from library.fileio import write_text_atomic

logger = logging.getLogger(__name__)

INFO_CACHE_FILE = "metadata_cache.json"
MAX_LISTED_MISSING = 5


@dataclass
class SubsetImages:
    """What discovery found for one subset: images, tag-frequency captions, sizes already known."""

    infos: list[ImageInfo]
    tag_captions: list[str] = field(default_factory=list)  # what ss_tag_frequency counts
    known_sizes: bool = False  # sizes came from metadata_cache.json (§4.2)


def _listing(directory: str) -> set[str]:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def find_caption_in(image_path: str, names: set[str], subset: SubsetParams) -> str | None:
    """``caption_files.find_caption`` with one directory listing instead of a stat per candidate."""
    directory = os.path.dirname(image_path)
    for candidate in caption_candidates(image_path, subset.caption_extension):
        if os.path.dirname(candidate) == directory:
            found = os.path.basename(candidate) in names
        else:  # the face-crop fallback may cut into the folder name (§4.1)
            found = os.path.isfile(candidate)
        if found:
            return read_caption_file(candidate, subset.enable_wildcard)
    return None


def discover_dreambooth(subset: SubsetParams, index: int) -> SubsetImages:
    """Images and captions of a DreamBooth (or ControlNet) subset, via ``metadata_cache.json`` (§4.1-4.2)."""
    cache_file = os.path.join(subset.image_dir, INFO_CACHE_FILE)
    if subset.cache_info and os.path.isfile(cache_file):
        return _from_info_cache(cache_file, subset, index)
    if subset.cache_info:
        logger.warning("image info file not found, it will be written: %s", cache_file)
    paths = glob_images(subset.image_dir)
    names = _listing(subset.image_dir)
    captions, missing, blank = [], [], []
    for path in paths:
        caption = find_caption_in(path, names, subset)
        if caption is None:
            missing.append(path)
            if subset.class_tokens is None:
                logger.warning("neither caption file nor class tokens are found, empty caption for %s", path)
            caption = subset.class_tokens or ""
        elif not caption.strip():
            blank.append(path)
        captions.append(caption)
    _log_missing(missing, subset)
    warn_blank_captions(blank, "caption files")
    infos = [ImageInfo(p, p, c, subset.num_repeats, subset.is_reg, index) for p, c in zip(paths, captions)]
    return SubsetImages(infos, captions)


def _from_info_cache(cache_file: str, subset: SubsetParams, index: int) -> SubsetImages:
    """Image list, captions and sizes from ``metadata_cache.json``, no staleness check (§4.2)."""
    logger.info("using cached image info for this subset: %s", cache_file)
    try:
        with open(cache_file, encoding="utf-8") as f:
            metas = json.load(f)
        infos = [ImageInfo(p, p, m["caption"], subset.num_repeats, subset.is_reg, index,
                           image_size=(int(m["resolution"][0]), int(m["resolution"][1])))
                 for p, m in metas.items()]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"cannot read {cache_file}: {e}; delete it to rebuild it") from None
    _log_missing([i.path for i in infos if not i.caption], subset)
    return SubsetImages(infos, [i.caption for i in infos], known_sizes=True)


def write_info_cache(subset: SubsetParams, infos: list[ImageInfo]) -> None:
    """Write ``<image_dir>/metadata_cache.json`` atomically (UTF-8, ensure_ascii=False, indent 2, §4.2)."""
    cache = {i.path: {"caption": i.caption, "resolution": list(i.image_size)} for i in infos}
    write_text_atomic(os.path.join(subset.image_dir, INFO_CACHE_FILE),
                      json.dumps(cache, ensure_ascii=False, indent=2))


def _log_missing(missing: list[str], subset: SubsetParams) -> None:
    if not missing:
        return
    logger.warning("no caption file found for %d images in %s; class tokens used: %r",
                   len(missing), subset.image_dir, subset.class_tokens)
    for path in missing[:MAX_LISTED_MISSING]:
        logger.warning("  %s", path)
    if len(missing) > MAX_LISTED_MISSING:
        logger.warning("  ... and %d more", len(missing) - MAX_LISTED_MISSING)


def warn_blank_captions(images: list[str], source: str) -> None:
    """A caption that is empty or only whitespace trains as "" (as sd-scripts): legal, but rarely meant."""
    if images:
        logger.warning("%d images have an empty or whitespace-only caption (from %s); they train without text: %s",
                       len(images), source, _first(images))


def discover_finetuning(subset: SubsetParams, index: int) -> SubsetImages:
    """Images and captions from a fine-tuning metadata JSON (§5); sizes from ``train_resolution``."""
    metadata = _read_metadata(subset.metadata_file)
    names = _listing(subset.image_dir) if subset.image_dir else set()
    infos, tag_captions = [], []
    for key, entry in metadata.items():
        path = _resolve_key(key, subset.image_dir, names)
        if path is None:
            raise UserError(f"{subset.metadata_file}: no image or npz found for key {key!r}"
                            + (f" in {subset.image_dir}" if subset.image_dir else ""))
        caption, counted = metadata_caption(entry, subset.caption_separator, subset.enable_wildcard)
        if counted:
            tag_captions.append(counted)
        info = ImageInfo(key, path, caption, subset.num_repeats, False, index)
        reso = entry.get("train_resolution")
        if reso is not None:
            info.image_size = (int(reso[0]), int(reso[1]))
        if not (subset.color_aug or subset.random_crop):
            info.latents_npz, info.latents_npz_flipped = _npz_for_key(key, subset.image_dir, names)
        infos.append(info)
    warn_blank_captions([i.key for i in infos if not i.caption.strip()], subset.metadata_file)
    return SubsetImages(infos, tag_captions)


def _read_metadata(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read metadata file {path}: {e}") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
        raise UserError(f"metadata file {path}: expected an object of objects keyed by image")
    return metadata


def _resolve_key(key: str, image_dir: str | None, names: set[str]) -> str | None:
    """Key → file: an existing path, ``<image_dir>/<key>.<ext>``, then a latents-only npz (§5)."""
    if os.path.isfile(key):
        return key
    if image_dir is not None:
        if os.sep in key or "/" in key:  # a sub-folder key: the listing does not cover it
            found = [os.path.join(image_dir, key + e) for e in image_extensions()
                     if os.path.isfile(os.path.join(image_dir, key + e))]
        else:
            found = [os.path.join(image_dir, key + e) for e in image_extensions() if key + e in names]
        if found:
            return sorted(found)[0]
    npz = os.path.splitext(key)[0] + ".npz"
    if os.path.isfile(npz):
        return npz
    if image_dir is not None and os.path.isfile(os.path.join(image_dir, key + ".npz")):
        return os.path.join(image_dir, key + ".npz")
    return None


def _npz_for_key(key: str, image_dir: str | None, names: set[str]) -> tuple[str | None, str | None]:
    """prepare_buckets_latents' ``<key>.npz`` (next to a full-path key, else in image_dir) and legacy flip."""
    base = os.path.splitext(key)[0]
    if os.path.isfile(base + ".npz"):
        flipped = base + "_flip.npz"
        return base + ".npz", flipped if os.path.isfile(flipped) else None
    if image_dir is None:
        return None, None
    norm, flipped = os.path.join(image_dir, key + ".npz"), os.path.join(image_dir, key + "_flip.npz")
    if not os.path.isfile(norm):
        return None, None
    return norm, flipped if os.path.isfile(flipped) else None


def pair_conditioning(subsets: list[SubsetParams], infos: list[ImageInfo]) -> None:
    """Set ``cond_path`` by stem; missing or extra conditioning images are one ``UserError`` (§6)."""
    missing: list[str] = []
    paired: set[str] = set()
    listings: dict[str, dict[str, str]] = {}
    for subset in subsets:
        by_stem: dict[str, str] = {}
        for path in glob_images(subset.conditioning_data_dir):  # sorted: the first path per stem wins
            by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], os.path.abspath(path))
        listings[subset.conditioning_data_dir] = by_stem
    for info in infos:
        by_stem = listings[subsets[info.subset].conditioning_data_dir]
        cond = by_stem.get(os.path.splitext(os.path.basename(info.path))[0])
        if cond is None:
            missing.append(info.path)
            continue
        info.cond_path = cond
        paired.add(cond)
    extra = sorted({p for by_stem in listings.values() for p in by_stem.values()} - paired)
    problems = []
    if missing:
        problems.append(f"missing conditioning images for {len(missing)} images: {_first(missing)}")
    if extra:
        problems.append(f"{len(extra)} extra conditioning images without an image: {_first(extra)}")
    if problems:
        raise UserError("; ".join(problems))


def _first(paths: list[str]) -> str:
    listed = ", ".join(paths[:MAX_LISTED_MISSING])
    return listed + (f" and {len(paths) - MAX_LISTED_MISSING} more" if len(paths) > MAX_LISTED_MISSING else "")
