"""Pixel transforms from a decoded image to a training tensor: area resize, bucket crop, flip, normalise.

spec dataset-config §7.3-7.4. Arrays are (H, W, C) uint8 as from ``images.load_image``.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from library.data.buckets import Reso, get_crop_ltrb
from library.errors import UserError


def _resize_axis_down(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Average over each output pixel's exact input span (OpenCV INTER_AREA when shrinking)."""
    in_size = image.shape[axis]
    scale = in_size / out_size
    edges = np.arange(out_size + 1, dtype=np.float64) * scale  # output pixel borders on the input axis
    edges[-1] = in_size
    index = np.minimum(np.floor(edges).astype(np.int64), in_size - 1)
    shape = [1] * image.ndim
    shape[axis] = -1
    frac = (edges - index).reshape(shape)
    # exact integer prefix sums for uint8 input keep the full-size pass cheap
    cumsum = np.cumsum(image, axis=axis, dtype=np.uint32 if image.dtype == np.uint8 else np.float64)
    before = np.take(cumsum, np.maximum(index - 1, 0), axis=axis).astype(np.float64)
    before *= (index > 0).reshape(shape)
    # integral of the piecewise-constant signal up to each fractional edge
    integral = before + frac * np.take(image, index, axis=axis)
    return np.diff(integral, axis=axis) / scale


def _resize_axis_up(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """OpenCV INTER_AREA when enlarging: nearest pixel, blended linearly only across pixel edges."""
    in_size = image.shape[axis]
    scale = in_size / out_size  # < 1
    inv = out_size / in_size
    dst = np.arange(out_size)
    src = np.floor(dst * scale).astype(np.int64)
    frac = (dst + 1) - (src + 1) * inv
    frac = np.where(frac <= 0, 0.0, frac - np.floor(frac))
    nxt = np.minimum(src + 1, in_size - 1)
    moved = np.moveaxis(image, axis, 0).astype(np.float64)
    shape = (-1,) + (1,) * (moved.ndim - 1)
    blended = moved[src] * (1 - frac).reshape(shape) + moved[nxt] * frac.reshape(shape)
    return np.moveaxis(blended, 0, axis)


def resize_area(image: np.ndarray, size: Reso) -> np.ndarray:
    """Resize to (width, height) following OpenCV's INTER_AREA definition, in numpy.

    sd-scripts calls ``cv2.resize(..., INTER_AREA)``; OpenCV is not a dependency here. Shrinking
    averages each output pixel's exact (fractional) input area; enlarging repeats pixels and
    blends across edges. Rounding is half-to-even as OpenCV's ``saturate_cast``; results may
    differ from cv2 by one level where OpenCV uses fixed-point arithmetic.
    """
    width, height = size
    out = image
    for axis, target in ((1, width), (0, height)):  # width first: the faster order in numpy
        if out.shape[axis] == target:
            continue
        resize = _resize_axis_down if out.shape[axis] > target else _resize_axis_up
        out = resize(out, target, axis)
    if out is image:
        return image.copy()
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def trim_and_resize(image: np.ndarray, bucket_reso: Reso, resized_size: Reso, random_crop: bool,
                    rng: random.Random) -> tuple[np.ndarray, Reso, tuple[float, float, float, float]]:
    """Resize to ``resized_size``, crop to the bucket; returns image, original size, crop_ltrb (spec §7.4)."""
    height, width = image.shape[:2]
    original_size = (width, height)
    if (width, height) != tuple(resized_size):
        image = resize_area(image, resized_size)
    height, width = image.shape[:2]
    # width first, then height: the order of the random draws matters for reproducibility
    if width > bucket_reso[0]:
        excess = width - bucket_reso[0]
        left = rng.randint(0, excess) if random_crop else excess // 2
        image = image[:, left:left + bucket_reso[0]]
    if height > bucket_reso[1]:
        excess = height - bucket_reso[1]
        top = rng.randint(0, excess) if random_crop else excess // 2
        image = image[top:top + bucket_reso[1]]
    if image.shape[:2] != (bucket_reso[1], bucket_reso[0]):
        raise ValueError(f"internal error: trimmed size {image.shape[1]}x{image.shape[0]} "
                         f"is not the bucket {bucket_reso[0]}x{bucket_reso[1]}")
    return image, original_size, get_crop_ltrb(bucket_reso, original_size)


def no_bucket_misfit(size: Reso, target: Reso, can_crop: bool) -> str | None:
    """Why an image of upright ``size`` fails on the no-bucket path (§7.3), or None when it fits.

    Exactly the conditions ``crop_without_bucket`` (and ``augment.face_crop`` before it) raise on,
    so the dataset scan can refuse these images before training. ``can_crop``: ``random_crop``, or a
    face crop applies to this image; either crops a larger image down, neither enlarges one.
    """
    width, height = size
    if not can_crop and (width > target[0] or height > target[1]):
        return "too large"
    if width < target[0] or height < target[1]:
        return "too small"
    return None


def crop_without_bucket(image: np.ndarray, target: Reso, random_crop: bool, rng: random.Random,
                        path: str = "") -> np.ndarray:
    """No-bucket path: the image must be W x H, or larger with ``random_crop`` (spec §7.3)."""
    height, width = image.shape[:2]
    if height > target[1] or width > target[0]:
        if not random_crop:
            raise UserError(f"image too large, but cropping and bucketing are disabled: enable "
                            f"face_crop_aug_range, random_crop or enable_bucket: {path}")
        if height > target[1]:
            top = rng.randint(0, height - target[1])
            image = image[top:top + target[1]]
        if width > target[0]:
            left = rng.randint(0, width - target[0])
            image = image[:, left:left + target[0]]
    if image.shape[:2] != (target[1], target[0]):
        raise UserError(f"image size is small: {width}x{height} < {target[0]}x{target[1]}: {path}")
    return image


def flip_horizontal(image: np.ndarray) -> np.ndarray:
    """Mirror left-right, contiguous (flip_aug, spec dataset-config §9)."""
    return np.ascontiguousarray(image[:, ::-1])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float32 in [-1, 1]: ToTensor then Normalize(0.5, 0.5) (spec §7.4)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)
    return tensor.sub(0.5).div(0.5)
