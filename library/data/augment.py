"""Image augmentations: ``color_aug`` (OpenCV-HSV hue shift or gamma) and ``face_crop_aug_range``.

spec dataset-config §9. Random draws come from an explicit ``random.Random``, in sd-scripts' order.
"""
from __future__ import annotations

import os
import random

import numpy as np

from library.data.buckets import Reso
from library.data.transforms import resize_area
from library.errors import UserError

HUE_SHIFT_LIMIT = 8
_SHIFT = 12  # OpenCV's hsv_shift: fixed-point bits of its 8-bit HSV tables
_HALF = 1 << (_SHIFT - 1)
_I = np.arange(256, dtype=np.float64)
with np.errstate(divide="ignore"):
    # OpenCV builds these with saturate_cast<int>, i.e. round half to even; index 0 is 0
    _SDIV = np.where(_I == 0, 0, np.rint((255 << _SHIFT) / _I)).astype(np.int64)
    _HDIV = np.where(_I == 0, 0, np.rint((180 << _SHIFT) / (6.0 * _I))).astype(np.int64)
# sector -> which of (v, p, q, t) becomes each of the three output channels
_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def bgr_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV ``COLOR_BGR2HSV`` for uint8 (hue 0-179, integer tables), channel 0 read as blue."""
    bgr = image.astype(np.int64)
    b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    v = bgr.max(axis=-1)
    diff = v - bgr.min(axis=-1)
    s = (diff * _SDIV[v] + _HALF) >> _SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + _HALF) >> _SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """OpenCV ``COLOR_HSV2BGR`` for uint8: float32 sector arithmetic, rounded half to even."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.fmod(h, np.float32(6.0))
    sector = np.floor(h).astype(np.int64)
    h = h - sector
    bad = (sector < 0) | (sector >= 6)
    sector, h = np.where(bad, 0, sector), np.where(bad, np.float32(0), h)
    one = np.float32(1.0)
    tab = np.stack([v, v * (one - s), v * (one - s * h), v * (one - s * (one - h))], axis=-1)
    out = np.take_along_axis(tab, _SECTORS[sector], axis=-1)
    out = np.where((s == 0)[..., None], v[..., None], out)  # grey: all channels = v
    return np.clip(np.rint(out * np.float32(255.0)), 0, 255).astype(np.uint8)


def shift_hue(image: np.ndarray, hue_shift: float) -> np.ndarray:
    """Shift hue in OpenCV units (0-180) via BGR<->HSV on the RGB array, as sd-scripts (spec §9)."""
    hsv = bgr_to_hsv(image)  # RGB read as BGR: sd-scripts' quirk, kept for identical colours
    if hue_shift < 0:
        hue_shift = 180 + hue_shift
    # float sum, modulo 180, truncated back to uint8 by the assignment (numpy's unsafe cast)
    hsv[..., 0] = ((hsv[..., 0].astype(np.float64) + hue_shift) % 180).astype(np.uint8)
    return hsv_to_bgr(hsv)


def color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """p=0.33: hue shift U(-8, 8) or gamma U(0.95, 1.05) on raw 0-255 values (spec dataset-config §9)."""
    if rng.random() <= 0.33:
        if rng.random() > 0.5:
            return shift_hue(image, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
        gamma = rng.uniform(0.95, 1.05)
        # gamma on 0-255 values, not 0-1: a large brightness change, kept for compatibility
        return np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    return image


def parse_face_info(path: str) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from ``<name>_<cx>_<cy>_<w>_<h>.<ext>``; None when the name has none (spec §9)."""
    pieces = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(pieces) < 5:
        return None
    try:
        return int(pieces[-4]), int(pieces[-3]), int(pieces[-2]), int(pieces[-1])
    except ValueError:
        return None  # sd-scripts crashes here; a name without numbers simply has no face info


def applicable_face(path: str, crop_range: tuple[float, float] | None) -> tuple[int, int, int, int] | None:
    """The face ``face_crop`` crops around for this image, or None when it does not apply (spec §9)."""
    if crop_range is None:
        return None
    face = parse_face_info(path)
    return face if face is not None and face[0] > 0 else None


def face_crop(image: np.ndarray, face: tuple[int, int, int, int], target: Reso,
              crop_range: tuple[float, float], random_crop: bool, rng: random.Random) -> np.ndarray:
    """Scale so the face fits ``crop_range``, then crop ``target`` around it (spec dataset-config §9)."""
    height, width = image.shape[:2]
    target_w, target_h = target
    if (height, width) == (target_h, target_w):
        return image
    face_cx, face_cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    size = min(target_w, target_h)
    cover = max(target_h / height, target_w / width)
    min_scale = min(1.0, max(cover, size / (face_size * crop_range[1])))
    max_scale = min(1.0, max(min_scale, size / (face_size * crop_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    if new_h < target_h or new_w < target_w:
        raise UserError(f"image size is small: {width}x{height} cannot cover {target_w}x{target_h}")
    image = resize_area(image, (new_w, new_h))
    face_pos = (int(face_cy * scale + 0.5), int(face_cx * scale + 0.5))
    for axis, (target_size, length, pos) in enumerate(zip((target_h, target_w), (new_h, new_w), face_pos)):
        start = pos - target_size // 2  # face centred
        if random_crop:
            spread = max(length - pos, pos)  # more background, face still likely near the centre
            start += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif crop_range[0] != crop_range[1] and face_size > size // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        start = max(0, min(start, length - target_size))
        image = image[start:start + target_size] if axis == 0 else image[:, start:start + target_size]
    return image
