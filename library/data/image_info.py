"""One training image's record, and bulk header reads that list every bad file at once.

spec dataset-config §4.1 (discovery), §7 (bucket fields), §10 (latent cache fields), §10.1 (TE cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from library.data.buckets import Reso
from library.data.images import bad_file_entry, bad_files_error, read_image_size
from library.errors import UserError

__all__ = ["ImageInfo", "bad_files_error", "read_sizes"]


@dataclass(slots=True, eq=False)
class ImageInfo:
    """Everything known about one image of one dataset (sd-scripts' ``ImageInfo``).

    ``slots``: a 100,000-image dataset keeps one of these per image, so no per-instance dict.
    """

    key: str  # image path (DreamBooth/ControlNet) or metadata key (fine-tuning)
    path: str  # the file to decode: an image, or the npz for latents-only fine-tuning
    caption: str
    num_repeats: int
    is_reg: bool
    subset: int  # index into the dataset's subsets
    image_size: Reso | None = None  # upright (w, h); fine-tuning: its train_resolution (§5)
    bucket: Reso | None = None
    resized_size: Reso | None = None
    cond_path: str | None = None  # ControlNet conditioning image (§6)
    # latent cache (§10): in memory ...
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    latents_original_size: tuple[int, int] | None = None
    latents_crop_ltrb: tuple[float, float, float, float] | None = None
    alpha_mask: torch.Tensor | None = None
    # ... or on disk
    latents_npz: str | None = None
    latents_npz_flipped: str | None = None  # legacy fine-tuning ``<key>_flip.npz``
    # text-encoder output cache (§10.1)
    te_outputs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    te_outputs_npz: str | None = None

    @property
    def has_cached_latents(self) -> bool:
        """Latents come from the cache (memory or npz), so the image is never decoded."""
        return self.latents is not None or self.latents_npz is not None


def read_sizes(paths: Iterable[str]) -> dict[str, Reso]:
    """Upright (w, h) of every image from its header; one ``UserError`` lists all unreadable files.

    This is the "header" scan: a file whose header parses and whose end is where its format says
    (``integrity``) is taken as readable. A few bytes per file keep a 100,000-image scan to seconds
    (bench/dataset_scan.py); ``scan_images`` decodes every file (``--verify_images``).
    """
    sizes: dict[str, Reso] = {}
    bad: list[str] = []
    for path in paths:
        try:
            sizes[path] = read_image_size(path)
        except UserError as e:
            bad.append(bad_file_entry(path, e))
    if bad:
        raise bad_files_error(bad)
    return sizes
