"""Aspect-ratio buckets: predefined and on-demand bucket sets, assignment, SDXL crop values.

Mirrors sd-scripts' ``BucketManager`` / ``make_bucket_resolutions`` (spec dataset-config §7).
Pure arithmetic: no image is read here; callers pass image sizes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from library.errors import UserError

logger = logging.getLogger(__name__)

Reso = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket, the size it is resized to first, and the aspect error."""

    bucket: Reso
    resized: Reso
    ar_error: float  # bucket w/h minus image w/h (signed, as sd-scripts records it)


def make_bucket_resolutions(max_reso: Reso, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Reso]:
    """Predefined bucket list for ``resolution`` (spec dataset-config §7.1)."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos: set[Reso] = set()
    # float division inside the floor, as sd-scripts' int(math.sqrt(area) // divisible)
    square = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((square, square))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def round_to_steps(x: float, steps: int) -> int:
    """Round half up to an int, then down to a multiple of ``steps`` (spec dataset-config §7.2)."""
    x = int(x + 0.5)
    return x - x % steps


def cover_size(image_size: Reso, bucket: Reso) -> Reso:
    """Size that covers ``bucket`` at the image's aspect ratio (spec dataset-config §7.1)."""
    width, height = image_size
    aspect = width / height
    if aspect > bucket[0] / bucket[1]:  # wider than the bucket: match heights
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def select_predefined(image_size: Reso, resos: Sequence[Reso]) -> BucketChoice:
    """Bucket with the least aspect error among ``resos``; an exact size wins (spec dataset-config §7.1)."""
    width, height = image_size
    aspect = width / height
    if tuple(image_size) in set(resos):
        # an exact match first: fine-tuning buckets may share an aspect ratio
        bucket = (width, height)
    else:
        errors = [abs(w / h - aspect) for w, h in resos]
        bucket = resos[errors.index(min(errors))]  # first on ties, like numpy's argmin
    return BucketChoice(tuple(bucket), cover_size(image_size, bucket), bucket[0] / bucket[1] - aspect)


def select_no_upscale(image_size: Reso, max_area: int, steps: int) -> BucketChoice:
    """On-demand bucket that never upscales (``bucket_no_upscale``, spec dataset-config §7.2)."""
    width, height = image_size
    aspect = width / height
    if width * height > max_area:
        resized_w = math.sqrt(max_area * aspect)
        resized_h = max_area / resized_w
        bw1 = round_to_steps(resized_w, steps)
        bh1 = round_to_steps(bw1 / aspect, steps)
        bh2 = round_to_steps(resized_h, steps)
        bw2 = round_to_steps(bh2 * aspect, steps)
        if 0 in (bw1, bh1, bw2, bh2):
            raise UserError(f"image size {width}x{height} is too far from square for bucket_no_upscale "
                            f"with a {max_area}-pixel area and bucket_reso_steps={steps}")
        if abs(bw1 / bh1 - aspect) < abs(bw2 / bh2 - aspect):
            resized = (bw1, int(bw1 / aspect + 0.5))
        else:
            resized = (int(bh2 * aspect + 0.5), bh2)
    else:
        resized = (width, height)
    # crop to a multiple of steps, never pad
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if bucket[0] == 0 or bucket[1] == 0:
        raise UserError(f"image size {width}x{height} is smaller than bucket_reso_steps={steps} "
                        "on one side: with bucket_no_upscale it cannot fill a bucket")
    return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)


def get_crop_ltrb(bucket: Reso, image_size: Reso) -> tuple[float, float, float, float]:
    """SDXL crop conditioning: the fit-inside box, not the real crop (spec dataset-config §7.4)."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket[1] * image_ar, bucket[1]
    else:
        resized_w, resized_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - resized_w) // 2  # float floor-division kept: values may be floats
    top = (bucket[1] - resized_h) // 2
    return left, top, left + resized_w, top + resized_h


def crop_top_left(crop_ltrb: Sequence[float], target_width: int, flipped: bool) -> tuple[int, int]:
    """SDXL ``crop_top_lefts`` entry (top, left); a flip mirrors left as width - right (spec §7.4)."""
    left = target_width - crop_ltrb[2] if flipped else crop_ltrb[0]
    return int(crop_ltrb[1]), int(left)


@dataclass
class BucketSet:
    """Buckets of one dataset and the image keys in them (sd-scripts' BucketManager, spec §7)."""

    resolution: Reso
    enable_bucket: bool = True
    no_upscale: bool = False
    min_size: int = 256
    max_size: int = 1024
    steps: int = 64
    predefined: list[Reso] | None = None
    resos: list[Reso] = field(default_factory=list)
    buckets: list[list[str]] = field(default_factory=list)
    ar_errors: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.resolution = (int(self.resolution[0]), int(self.resolution[1]))
        if self.predefined is not None:
            self.predefined = sorted(set(map(tuple, self.predefined)))
        elif not self.enable_bucket:
            self.predefined = [self.resolution]  # one fixed bucket (spec §7.3)
        elif not self.no_upscale:
            self.predefined = make_bucket_resolutions(self.resolution, self.min_size, self.max_size, self.steps)
        else:
            logger.warning("min_bucket_reso and max_bucket_reso are ignored if bucket_no_upscale is set, "
                           "because bucket reso is defined by image size automatically")

    @classmethod
    def from_resolutions(cls, resos: Iterable[Reso]) -> "BucketSet":
        """Buckets fixed to a given list (fine-tuning ``train_resolution`` values, spec §5)."""
        resos = list(resos)
        return cls(resolution=max(resos, key=lambda r: r[0] * r[1]), predefined=resos)

    def select(self, image_size: Reso) -> BucketChoice:
        """Choose the bucket for one image size (spec dataset-config §7.1-7.3)."""
        if self.predefined is not None:
            return select_predefined(image_size, self.predefined)
        return select_no_upscale(image_size, self.resolution[0] * self.resolution[1], self.steps)

    def add_image(self, key: str, image_size: Reso, num_repeats: int = 1, name: str | None = None) -> BucketChoice:
        """Assign ``key`` to its bucket ``num_repeats`` times; returns the choice.

        An image no bucket can take is a ``UserError`` starting with ``name`` (default: ``key``).
        """
        try:
            choice = self.select(image_size)
        except UserError as e:
            raise UserError(f"{key if name is None else name}: {e}") from None
        if choice.bucket not in self.resos:
            self._insert_bucket(choice.bucket)
        self.buckets[self.resos.index(choice.bucket)].extend([key] * num_repeats)
        self.ar_errors.append(abs(choice.ar_error))
        return choice

    def _insert_bucket(self, reso: Reso) -> None:
        # kept sorted by (w, h) at all times: sd-scripts sorts once after assignment, same result
        index = sum(1 for r in self.resos if r < reso)
        self.resos.insert(index, reso)
        self.buckets.insert(index, [])

    def mean_ar_error(self) -> float:
        """Mean |aspect error| over images, without repeats (``mean_img_ar_error``)."""
        return sum(self.ar_errors) / len(self.ar_errors) if self.ar_errors else 0.0

    def bucket_info(self) -> dict:
        """Metadata ``ss_bucket_info`` value: non-empty buckets and the mean error (spec §7.5)."""
        buckets = {i: {"resolution": reso, "count": len(keys)}
                   for i, (reso, keys) in enumerate(zip(self.resos, self.buckets)) if keys}
        return {"buckets": buckets, "mean_img_ar_error": self.mean_ar_error()}

    def log_summary(self) -> None:
        """Log bucket counts like sd-scripts (with repeats) and the mean aspect error."""
        logger.info("number of images (including repeats) per bucket")
        for i, (reso, keys) in enumerate(zip(self.resos, self.buckets)):
            if keys:
                logger.info(f"bucket {i}: resolution {reso}, count: {len(keys)}")
        logger.info(f"mean ar error (without repeats): {self.mean_ar_error()}")
