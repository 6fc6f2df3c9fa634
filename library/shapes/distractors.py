"""The judge's labelled calibration set: clean shapes of the world, and distractors that are none of them.

A strict judge must say ``none`` when an image shows something that is not one of the shapes, even when
that something is closer to one shape than to the others. The distractors are the near misses a tiny
diffusion model draws: ellipses (a circle stretched far beyond the world's ~15%), lumpy round blobs,
squares with strongly rounded corners, shields (flat top, pointed bottom, no notch: a heart gone wrong),
diamonds (not one of the judged shapes), two shapes merged into one blob, shapes with a bite taken out or
cut off by the image edge, shapes blurred until their corners and points are gone, and canvases with no
shape at all, only strong blotchy noise. Everything is drawn like the world itself (4x supersampled,
world backgrounds and palette), deterministically from ``(seed, index)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFilter

from . import world

DISTRACTORS = ("ellipse", "blob", "rounded_square", "shield", "diamond", "merged", "bite", "clipped",
               "blurred", "noise")
NONE = "none"
CLEAN_SHAPES = world.BASE_SHAPES + (world.NEW_SHAPE,)


@dataclass(frozen=True)
class Labelled:
    """One image of the calibration set: what a person would say it shows (a shape or ``none``)."""

    image: np.ndarray
    label: str
    kind: str  # the shape, or the distractor kind
    color: str


def _ring(radius: np.ndarray) -> np.ndarray:
    """A closed outline from radii sampled at evenly spaced angles (first point straight up)."""
    ts = -math.pi / 2 + np.linspace(0, 2 * math.pi, len(radius), endpoint=False)
    return np.stack([radius * np.cos(ts), radius * np.sin(ts)], 1)


def _norm(points: np.ndarray) -> np.ndarray:
    lo, hi = points.min(0), points.max(0)
    return (points - lo) / (hi - lo) * 2 - 1


def blob_polygon(rng: np.random.Generator) -> np.ndarray:
    """A lumpy round blob: the radius wobbles with 2-3 lobes (no corners, no points)."""
    ts = np.linspace(0, 2 * math.pi, 120, endpoint=False)
    r = np.ones_like(ts)
    for k in (2, 3):
        r += rng.uniform(0.07, 0.15) * np.cos(k * ts + rng.uniform(0, 2 * math.pi))
    return _norm(_ring(r))


def rounded_square_polygon(rng: np.random.Generator) -> np.ndarray:
    """A square whose corners are arcs of 50-85% of the half side."""
    rad = rng.uniform(0.5, 0.85)
    pts = []
    for cx, cy, a0 in ((1, 1, 0), (-1, 1, 90), (-1, -1, 180), (1, -1, 270)):
        for a in np.radians(np.linspace(a0, a0 + 90, 12)):
            pts.append((cx - math.copysign(rad, cx) + rad * math.cos(a), cy - math.copysign(rad, cy) + rad * math.sin(a)))
    return _norm(np.asarray(pts))


def shield_polygon(rng: np.random.Generator) -> np.ndarray:
    """A shield: a flat (or slightly domed) top, straight sides, then curves meeting in a bottom point."""
    shoulder = rng.uniform(-0.4, 0.1)  # where the sides start to curve in (y grows downwards)
    dome = rng.uniform(0.0, 0.12)
    top = [(x, -1 - dome * (1 - x * x)) for x in np.linspace(-1, 1, 15)]
    cx, cy = rng.uniform(0.85, 1.0), shoulder + rng.uniform(0.35, 0.6) * (1 - shoulder)
    right = []
    for t in np.linspace(0, 1, 16):  # quadratic Bezier from (1, shoulder) via (cx, cy) to the point (0, 1)
        right.append(((1 - t) ** 2 + 2 * t * (1 - t) * cx, (1 - t) ** 2 * shoulder + 2 * t * (1 - t) * cy + t * t))
    left = [(-x, y) for x, y in reversed(right[:-1])]
    return _norm(np.asarray(top + right + left))


def _alpha(poly: np.ndarray, w: int, h: int, box: tuple[float, float, float, float]) -> np.ndarray:
    return world.polygon_alpha(poly, w, h, box)


def _ellipse(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    aspect = rng.uniform(1.45, 2.2)
    long_side = rng.uniform(0.6, 0.85) * max(w, h) if rng.random() < 0.5 else rng.uniform(0.65, 0.9) * min(w, h)
    long_side = min(long_side, (w if w >= h else h) - 4)
    bw, bh = (long_side, long_side / aspect) if (w >= h) == (rng.random() < 0.8) else (long_side / aspect, long_side)
    bw, bh = min(bw, w - 4), min(bh, h - 4)
    x0, y0 = rng.uniform(2, w - 2 - bw), rng.uniform(2, h - 2 - bh)
    return _alpha(world.SHAPE_POLYGONS["circle"], w, h, (x0, y0, x0 + bw, y0 + bh))


def _merged(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Two shapes of the world overlapping into one blob (each 40-55% of the short side)."""
    a, b = rng.choice(CLEAN_SHAPES, size=2)
    side = rng.uniform(0.4, 0.55) * min(w, h)
    ang = rng.uniform(0, 2 * math.pi)
    off = rng.uniform(0.35, 0.6) * side
    cx, cy = w / 2 + rng.uniform(-3, 3), h / 2 + rng.uniform(-3, 3)
    boxes = []
    for sgn in (-0.5, 0.5):
        x, y = cx + sgn * off * math.cos(ang), cy + sgn * off * math.sin(ang)
        boxes.append((x - side / 2, y - side / 2, x + side / 2, y + side / 2))
    return np.maximum(world.shape_alpha(str(a), w, h, boxes[0]), world.shape_alpha(str(b), w, h, boxes[1]))


def _bite(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A world shape with a round bite (a disc of 30-45% of its size) taken out of its outline."""
    box = world.shape_box(rng, w, h)
    alpha = world.shape_alpha(str(rng.choice(CLEAN_SHAPES)), w, h, box)
    x0, y0, x1, y1 = box
    ang = rng.uniform(0, 2 * math.pi)
    bx, by = (x0 + x1) / 2 + 0.5 * (x1 - x0) * math.cos(ang), (y0 + y1) / 2 + 0.5 * (y1 - y0) * math.sin(ang)
    r = rng.uniform(0.3, 0.45) * min(x1 - x0, y1 - y0)
    disc = _alpha(world.SHAPE_POLYGONS["circle"], w, h, (bx - r, by - r, bx + r, by + r))
    return alpha * (1 - disc)


def _clipped(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A world shape pushed 35-55% of its size over one edge of the canvas."""
    x0, y0, x1, y1 = world.shape_box(rng, w, h)
    bw, bh = x1 - x0, y1 - y0
    side = int(rng.integers(4))
    cut = rng.uniform(0.35, 0.55)
    if side == 0:
        x0 = -cut * bw
    elif side == 1:
        x0 = w - (1 - cut) * bw
    elif side == 2:
        y0 = -cut * bh
    else:
        y0 = h - (1 - cut) * bh
    return world.shape_alpha(str(rng.choice(CLEAN_SHAPES)), w, h, (x0, y0, x0 + bw, y0 + bh))


def _blurred(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A cornered shape (not the circle) blurred by 15-25% of its size: its corners and points are gone."""
    box = world.shape_box(rng, w, h)
    alpha = world.shape_alpha(str(rng.choice(CLEAN_SHAPES[1:])), w, h, box)
    radius = rng.uniform(0.15, 0.25) * min(box[2] - box[0], box[3] - box[1])
    img = Image.fromarray((alpha * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(img, dtype=np.float64) / 255.0


def _polygon_kind(kind: str, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    poly = {"blob": blob_polygon, "rounded_square": rounded_square_polygon, "shield": shield_polygon,
            "diamond": lambda _: world.SHAPE_POLYGONS["diamond"]}[kind](rng)
    return _alpha(poly, w, h, world.shape_box(rng, w, h))


def _noise_canvas(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """No shape: a world canvas with strong low-frequency blotches (12-30 grey levels) and pixel noise."""
    bg, _ = world.background(rng, w, h)
    small = rng.normal(0, rng.uniform(12, 30), size=(max(2, h // 8), max(2, w // 8), 3))
    blot = np.stack([np.asarray(Image.fromarray(small[..., c].astype(np.float32), "F").resize((w, h), Image.BICUBIC))
                     for c in range(3)], -1)
    img = bg + blot + rng.normal(0, rng.uniform(2, 8), size=(h, w, 1))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def distractor(kind: str, rng: np.random.Generator, color: str, size: tuple[int, int]) -> np.ndarray:
    """One distractor image (H x W x 3 uint8) of ``kind`` (one of ``DISTRACTORS``)."""
    w, h = size
    if kind == "noise":
        return _noise_canvas(rng, w, h)
    bg, _ = world.background(rng, w, h)
    makers = {"ellipse": _ellipse, "merged": _merged, "bite": _bite, "clipped": _clipped, "blurred": _blurred}
    alpha = makers[kind](rng, w, h) if kind in makers else _polygon_kind(kind, rng, w, h)
    return world.paint(bg, alpha, color, rng)


def labelled_set(per_shape: int, per_distractor: int, seed: int, shapes: Sequence[str] = CLEAN_SHAPES,
                 kinds: Sequence[str] = DISTRACTORS) -> Iterator[Labelled]:
    """``per_shape`` clean world images of each shape, then ``per_distractor`` images of each distractor kind,
    colours and canvases cycling through the palette and the world's sizes. Deterministic in ``seed``."""
    colors = world.MODEL_COLORS
    for j, shape in enumerate(shapes):
        for k in range(per_shape):
            color = colors[(k + j) % len(colors)]
            rng = np.random.default_rng([seed, 0, j, k])
            img, _ = world.render(color, shape, world.SIZES[k % len(world.SIZES)], rng)
            yield Labelled(img, shape, shape, color)
    for j, kind in enumerate(kinds):
        for k in range(per_distractor):
            color = colors[(k + j) % len(colors)]
            rng = np.random.default_rng([seed, 1, j, k])
            yield Labelled(distractor(kind, rng, color, world.SIZES[k % len(world.SIZES)]), NONE, kind, color)
