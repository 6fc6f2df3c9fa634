"""Latent cache: encode every image once with the caller's VAE, in memory or as ``<image>.npz``.

spec dataset-config §10. The VAE is not imported here (data never imports models): the caller passes
``encode_fn(images (B,3,H,W) in [-1,1]) -> latents (B,4,H/8,W/8)``, the unscaled ``latent_dist.sample()``.

Fix of spec pitfall 13: images are batched per bucket **and per flip_aug setting** of their own
subset, so every image whose subset flips gets flipped latents (v0.8.7 used one subset's flag for
all batches of a dataset). Writes are atomic: a temporary file in the same folder, then a rename.
"""
from __future__ import annotations

import logging
import os
import random
import zipfile
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from library.data.buckets import Reso
from library.data.image_info import ImageInfo
from library.data.images import load_image
from library.data.transforms import to_tensor, trim_and_resize
from library.errors import UserError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]
REQUIRED_KEYS = ("latents", "original_size", "crop_ltrb")


@dataclass
class CachedLatents:
    """The contents of one latent npz (§10 table)."""

    latents: torch.Tensor
    original_size: tuple
    crop_ltrb: tuple
    latents_flipped: torch.Tensor | None = None
    alpha_mask: torch.Tensor | None = None


def npz_shapes(path: str) -> dict[str, tuple]:
    """Array shapes of an ``.npz`` from the array headers only (no data read); {} if unreadable."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shapes[name[:-4]] = tuple(read(f)[0])
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}
    return shapes


def is_cache_valid(path: str, bucket: Reso, flip_aug: bool, alpha_mask: bool, latent_factor: int = 8) -> bool:
    """Reuse test of §10: keys present, latent size = bucket / the VAE's factor (8 for real models), flipped
    when needed, alpha as set."""
    if not os.path.isfile(path):
        return False
    shapes = npz_shapes(path)
    if any(key not in shapes for key in REQUIRED_KEYS):
        return False
    expected = (bucket[1] // latent_factor, bucket[0] // latent_factor)
    if shapes["latents"][1:3] != expected:
        return False
    if flip_aug and shapes.get("latents_flipped", (None,))[1:3] != expected:
        return False
    if alpha_mask:  # [v0.9.0+]: presence must match the setting, at pixel size
        return shapes.get("alpha_mask") == (bucket[1], bucket[0])
    return "alpha_mask" not in shapes


def load_latents_npz(path: str, legacy_flip_path: str | None = None) -> CachedLatents:
    """Read a latent npz; fine-tuning's legacy ``<key>_flip.npz`` supplies flipped latents if given."""
    try:
        with np.load(path) as npz:
            if "latents" not in npz:
                raise UserError(f"{path} is an old-format npz without 'latents': create it again")
            flipped = torch.from_numpy(npz["latents_flipped"]) if "latents_flipped" in npz else None
            alpha = torch.from_numpy(npz["alpha_mask"]) if "alpha_mask" in npz else None
            cached = CachedLatents(torch.from_numpy(npz["latents"]), tuple(npz["original_size"].tolist()),
                                   tuple(npz["crop_ltrb"].tolist()), flipped, alpha)
        if cached.latents_flipped is None and legacy_flip_path is not None:
            with np.load(legacy_flip_path) as npz:
                cached.latents_flipped = torch.from_numpy(npz["latents"] if "latents" in npz else npz["arr_0"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read latent cache {path}: {e}") from None
    return cached


def save_latents_npz(path: str, cached: CachedLatents) -> None:
    """``np.savez`` (uncompressed) through a temporary name and a rename (§10 keys)."""
    arrays = {"latents": cached.latents.float().cpu().numpy(),
              "original_size": np.array(cached.original_size),
              "crop_ltrb": np.array(cached.crop_ltrb)}
    if cached.latents_flipped is not None:
        arrays["latents_flipped"] = cached.latents_flipped.float().cpu().numpy()
    if cached.alpha_mask is not None:
        arrays["alpha_mask"] = cached.alpha_mask.float().cpu().numpy()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)


def check_latent_cacheable(subsets: Iterable) -> None:
    """color_aug and random_crop change pixels every step, so their latents cannot be cached (§10)."""
    bad = [s.image_dir or s.metadata_file for s in subsets if s.color_aug or s.random_crop]
    if bad:
        raise UserError("latents cannot be cached when color_aug or random_crop is set "
                        f"(--cache_latents / --cache_latents_to_disk): subsets {', '.join(map(str, bad))}")


def cache_latents(group, encode_fn: EncodeFn, vae_batch_size: int, to_disk: bool, is_main_process: bool = True,
                  skip_existing: bool = False, overwrite: bool = False, suffix: str = ".npz") -> None:
    """Encode every image of every dataset of ``group`` once (spec dataset-config §10).

    ``to_disk``: ``<image path without ext>.npz`` next to each image, reused when it passes the
    reuse test (``skip_existing`` is accepted for tools/cache_latents.py and means the same);
    ``overwrite`` re-encodes valid files too (that tool without ``--skip_existing``). Without
    ``to_disk`` the latents stay in memory on each ``ImageInfo``. Non-main processes only learn the
    file names. Fine-tuning images with prepare_buckets_latents npz are left as they are. ``suffix``: the file
    name's end (FLUX.1's 16-channel latents: ``_flux_latents.npz``, never taken for an SD VAE's).
    """
    del skip_existing  # the reuse test always applies unless overwrite
    for dataset in group.datasets:
        check_latent_cacheable(dataset.subsets)
    todo: list[tuple[ImageInfo, bool, bool]] = []
    for dataset in group.datasets:
        for info in dataset.images:
            subset = dataset.subsets[info.subset]
            if info.latents_npz is not None:
                continue  # fine-tuning latents from prepare_buckets_latents (§5), or cached before
            if to_disk:
                info.latents_npz = os.path.splitext(info.path)[0] + suffix
                if not is_main_process or (not overwrite and is_cache_valid(
                        info.latents_npz, info.bucket, subset.flip_aug, subset.alpha_mask,
                        getattr(group, "latent_factor", 8))):
                    continue
            elif info.latents is not None:
                continue
            todo.append((info, subset.flip_aug, subset.alpha_mask))
    if to_disk and not is_main_process:
        return
    batches = _batches(todo, vae_batch_size)
    for batch in tqdm(batches, desc="caching latents", smoothing=1, disable=not batches):
        encode_batch(batch, encode_fn, to_disk)


def _batches(todo: list[tuple[ImageInfo, bool, bool]], size: int) -> list[list[tuple[ImageInfo, bool, bool]]]:
    """Sorted by bucket area; a batch holds one bucket and one flip_aug setting (pitfall 13 fixed)."""
    def group_key(item):
        info, flip, _ = item
        return info.bucket[0] * info.bucket[1], info.bucket, flip

    batches = []
    for _, items in groupby(sorted(todo, key=group_key), key=group_key):
        items = list(items)
        batches += [items[i:i + size] for i in range(0, len(items), max(1, size))]
    return batches


def encode_batch(batch: Sequence[tuple[ImageInfo, bool, bool]], encode_fn: EncodeFn, to_disk: bool) -> None:
    """Load, fit to the bucket (centre crop), encode (and encode flipped), then store or write."""
    images, entries = [], []
    for info, _, with_alpha in batch:
        pixels = load_image(info.path, alpha=with_alpha)
        pixels, original_size, crop_ltrb = trim_and_resize(pixels, info.bucket, info.resized_size, False,
                                                           random.Random(0))  # no random draw: centre crop
        alpha = torch.from_numpy(pixels[:, :, 3].astype(np.float32) / 255.0) if with_alpha else None
        images.append(to_tensor(pixels[:, :, :3]))
        entries.append(CachedLatents(None, tuple(original_size), tuple(crop_ltrb), None, alpha))
    pixels = torch.stack(images)
    flip = batch[0][1]
    with torch.no_grad():
        latents = encode_fn(pixels).to("cpu")
        flipped = encode_fn(torch.flip(pixels, dims=[3])).to("cpu") if flip else [None] * len(batch)
    for (info, _, _), entry, latent, latent_flipped in zip(batch, entries, latents, flipped):
        if torch.isnan(latent).any() or (latent_flipped is not None and torch.isnan(latent_flipped).any()):
            raise UserError(f"NaN detected in latents of {info.path}: try --no_half_vae or a float32 VAE")
        entry.latents, entry.latents_flipped = latent, latent_flipped
        if to_disk:
            save_latents_npz(info.latents_npz, entry)
        else:
            info.latents, info.latents_flipped = latent, latent_flipped
            info.latents_original_size, info.latents_crop_ltrb = entry.original_size, entry.crop_ltrb
            info.alpha_mask = entry.alpha_mask
