"""A second, independent shape reading: template IoU against the shapes' own rasterisation.

It shares no code with the judge (``judge.py`` / ``evaluate.py``): its own background estimate (the
median colour of the image frame, no plane), its own threshold (half the foreground's strong distance,
no Otsu), its own connected components (a flood fill), and no features at all. The foreground mask is
cropped to its bounding box, resampled to ``SIDE`` x ``SIDE`` and compared with each shape's polygon
(``world.SHAPE_POLYGONS``, the definition the world draws from) rasterised into the same square.
Verdict: the shape with the best IoU when it is at least ``IOU_MIN`` and beats the runner-up by
``IOU_MARGIN``, and the box is no longer than ``ASPECT_MAX`` : 1; otherwise ``none``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from . import world

NONE = "none"
SIDE = 48
IOU_MIN = 0.8
IOU_MARGIN = 0.04
ASPECT_MAX = 1.35  # the world stretches a shape by at most ~1.16; a longer box is none of the shapes
CHECK_SHAPES = world.BASE_SHAPES + (world.NEW_SHAPE,)


@dataclass(frozen=True)
class Reading:
    shape: str  # one of CHECK_SHAPES or "none"
    ious: dict[str, float]


def frame_background(img: np.ndarray, width: int = 3) -> np.ndarray:
    """Median colour of the outer ``width`` pixels."""
    frame = np.concatenate([img[:width].reshape(-1, 3), img[-width:].reshape(-1, 3),
                            img[:, :width].reshape(-1, 3), img[:, -width:].reshape(-1, 3)])
    return np.median(frame.astype(np.float64), axis=0)


def biggest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (flood fill with an explicit stack)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, region = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def foreground(img: np.ndarray) -> np.ndarray:
    """Boolean mask of the main object: farther from the frame colour than half its strong distance."""
    dist = np.sqrt(((img.astype(np.float64) - frame_background(img)) ** 2).sum(-1))
    strong = np.percentile(dist, 97)
    if strong < 25:  # nothing stands out from the background
        return np.zeros(dist.shape, bool)
    return biggest_region(dist > strong / 2)


@functools.lru_cache(maxsize=None)
def template(shape: str) -> np.ndarray:
    """The shape's polygon rasterised to fill a ``SIDE`` x ``SIDE`` square (boolean)."""
    return world.shape_alpha(shape, SIDE, SIDE, (0, 0, SIDE, SIDE)) > 0.5


def box_mask(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to its bounding box and resampled to ``SIDE`` x ``SIDE`` (boolean)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    return np.asarray(Image.fromarray(crop, "F").resize((SIDE, SIDE), Image.BILINEAR)) > 0.5


def read_shape(img: np.ndarray | Image.Image, shapes: Sequence[str] = CHECK_SHAPES) -> Reading:
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    mask = foreground(arr)
    if mask.sum() < 16:
        return Reading(NONE, {})
    ys, xs = np.nonzero(mask)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    if max(w / h, h / w) > ASPECT_MAX:
        return Reading(NONE, {})
    m = box_mask(mask)
    ious = {s: float((m & template(s)).sum() / max((m | template(s)).sum(), 1)) for s in shapes}
    ranked = sorted(ious.values(), reverse=True)
    best = max(ious, key=ious.get)
    if ranked[0] >= IOU_MIN and ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0) >= IOU_MARGIN:
        return Reading(best, ious)
    return Reading(NONE, ious)
