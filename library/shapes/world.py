"""The shapes world: one coloured shape on a neutral background, captioned ``a <colour> <shape>``.

Images are drawn with Pillow at 4x and box-filtered down, so edges are anti-aliased like a photo.
Sample ``i`` of a seed depends only on ``(seed, i)``: the first 100 of a 1000-image set are the
100-image set, and a held-out split never changes what the training split looks like.

Sizes vary in three ways so that aspect-ratio buckets matter: the canvas (64x64, 80x48, 48x80), the
shape's size and position, and a mild stretch of the shape itself. Every shape is drawn to fill its own
bounding box exactly, which is what lets the evaluator compare shapes of any size and stretch.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from library.fileio import atomic_path, write_text_atomic

# Colours far apart in hue so a tiny, blurry model can still be judged on them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "yellow": (240, 210, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "purple": (150, 60, 195),
    "orange": (245, 135, 30),
    "cyan": (40, 195, 210),
    "pink": (240, 120, 190),
}
BASE_COLORS = ("red", "yellow", "green", "blue", "purple")
BASE_SHAPES = ("circle", "square", "triangle", "star", "cross")
# The demo base model (models/shapes-sd1.safetensors) was trained on every palette colour with the base
# shapes, except the held-out pairs: a Latin diagonal of the first five colours, so every base colour and
# every shape is held out once and a model must compose what it has only seen apart.
MODEL_COLORS = tuple(PALETTE)
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "circle"), ("yellow", "square"), ("green", "triangle"),
                                              ("blue", "star"), ("purple", "cross"))
# The "new concept" the demo LoRA teaches: never in the base world.
NEW_SHAPE = "heart"
ALL_SHAPES = BASE_SHAPES + ("heart", "diamond")
SIZES: tuple[tuple[int, int], ...] = ((64, 64), (80, 48), (48, 80))  # (width, height), multiples of 16
BACKGROUNDS = ("plain", "gradient", "noise")
SUPERSAMPLE = 4

Pair = tuple[str, str]  # (colour, shape)


def _normalise(points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Map a polygon onto the box [-1, 1]^2 exactly (so size means bounding box for every shape)."""
    p = np.asarray(points, dtype=np.float64)
    lo, hi = p.min(0), p.max(0)
    return (p - lo) / (hi - lo) * 2 - 1


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(points * 2):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points  # first point straight up (image y grows downwards)
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _cross(half_width: float = 0.34) -> list[tuple[float, float]]:
    t = half_width
    return [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]


def _heart(n: int = 96) -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return list(zip(x, y))


def _circle(n: int = 96) -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return list(zip(np.cos(ts), np.sin(ts)))


SHAPE_POLYGONS: dict[str, np.ndarray] = {
    "circle": _normalise(_circle()),
    "square": _normalise([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _normalise([(0, -1), (1, 1), (-1, 1)]),
    "star": _normalise(_star()),
    "cross": _normalise(_cross()),
    "heart": _normalise(_heart()),
    "diamond": _normalise([(0, -1), (1, 0), (0, 1), (-1, 0)]),
}


@dataclass(frozen=True)
class Sample:
    """One rendered image and what it shows."""

    index: int
    color: str
    shape: str
    image: np.ndarray  # H x W x 3 uint8
    background: str

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape)

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")


def caption_for(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def check_names(colors: Iterable[str], shapes: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the first unknown colour or shape."""
    for c in colors:
        if c not in PALETTE:
            raise ValueError(f"unknown colour {c!r} (known: {', '.join(PALETTE)})")
    for s in shapes:
        if s not in SHAPE_POLYGONS:
            raise ValueError(f"unknown shape {s!r} (known: {', '.join(SHAPE_POLYGONS)})")


def parse_pairs(text: str) -> list[Pair]:
    """``"red:circle, blue:star"`` (or ``red circle``) -> ``[("red", "circle"), ("blue", "star")]``."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.replace(":", " ").split()
        if len(parts) != 2:
            raise ValueError(f"bad colour:shape pair {item!r}")
        pairs.append((parts[0], parts[1]))
    check_names([c for c, _ in pairs], [s for _, s in pairs])
    return pairs


def diagonal_holdout(colors: Sequence[str], shapes: Sequence[str], offset: int = 0) -> list[Pair]:
    """A Latin diagonal of colour x shape pairs: every colour and every shape is held out exactly once
    (for square grids), so a model must compose a colour and a shape it has only seen apart."""
    n = max(len(colors), len(shapes))
    return sorted({(colors[i % len(colors)], shapes[(i + offset) % len(shapes)]) for i in range(n)})


def split_pairs(colors: Sequence[str], shapes: Sequence[str], holdout: Sequence[Pair], split: str) -> list[Pair]:
    """The colour x shape pairs of ``split`` (``all``, ``train`` = not held out, ``holdout``)."""
    pairs = list(itertools.product(colors, shapes))
    held = set(holdout)
    if split == "train":
        pairs = [p for p in pairs if p not in held]
    elif split == "holdout":
        pairs = [p for p in pairs if p in held]
    elif split != "all":
        raise ValueError(f"unknown split {split!r} (all, train, holdout)")
    if not pairs:
        raise ValueError(f"split {split!r} has no colour x shape pairs")
    return pairs


# ---------------------------------------------------------------- drawing

def _background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """A neutral grey (slightly tinted) canvas: plain, a linear gradient, or soft noise."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    grey = rng.uniform(70, 200) + rng.uniform(-6, 6, size=3)
    img = np.broadcast_to(grey, (h, w, 3)).astype(np.float64)
    if kind == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        ramp = (xx - w / 2) * math.cos(ang) + (yy - h / 2) * math.sin(ang)
        img = img + (ramp / (max(w, h) / 2) * rng.uniform(10, 30))[..., None]
    elif kind == "noise":
        # low-frequency texture: noise at a quarter of the size, smoothly enlarged
        small = rng.normal(0, rng.uniform(4, 9), size=(max(2, h // 4), max(2, w // 4)))
        tex = Image.fromarray(small.astype(np.float32), "F").resize((w, h), Image.BILINEAR)
        img = img + np.asarray(tex)[..., None] + rng.normal(0, 1.5, size=(h, w, 1))
    return img, kind


def shape_alpha(shape: str, w: int, h: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Anti-aliased coverage (H x W floats in [0, 1]) of ``shape`` filling ``box`` = (x0, y0, x1, y1)."""
    return polygon_alpha(SHAPE_POLYGONS[shape], w, h, box)


def polygon_alpha(poly: np.ndarray, w: int, h: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Anti-aliased coverage of a polygon given in [-1, 1]^2, mapped onto ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    s = SUPERSAMPLE
    px = (x0 + (poly[:, 0] + 1) / 2 * (x1 - x0)) * s
    py = (y0 + (poly[:, 1] + 1) / 2 * (y1 - y0)) * s
    mask = Image.new("L", (w * s, h * s), 0)
    ImageDraw.Draw(mask).polygon(list(zip(px.tolist(), py.tolist())), fill=255)
    return np.asarray(mask.resize((w, h), Image.BOX), dtype=np.float64) / 255.0


def _shape_box(rng: np.random.Generator, w: int, h: int) -> tuple[float, float, float, float]:
    """Bounding box: 50-80% of the short side, stretched up to ~15% either way, anywhere inside."""
    side = rng.uniform(0.5, 0.8) * min(w, h)
    stretch = math.exp(rng.uniform(-0.15, 0.15))
    bw, bh = min(side * math.sqrt(stretch), w - 4), min(side / math.sqrt(stretch), h - 4)
    x0 = rng.uniform(2, w - 2 - bw)
    y0 = rng.uniform(2, h - 2 - bh)
    return x0, y0, x0 + bw, y0 + bh


def render(color: str, shape: str, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Draw one image (H x W x 3 uint8) of a ``color`` ``shape`` on a canvas of ``size`` = (w, h)."""
    w, h = size
    bg, kind = _background(rng, w, h)
    return paint(bg, shape_alpha(shape, w, h, _shape_box(rng, w, h)), color, rng), kind


def background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """A canvas of the world's kind (float H x W x 3) and its kind (plain, gradient, noise)."""
    return _background(rng, w, h)


def shape_box(rng: np.random.Generator, w: int, h: int) -> tuple[float, float, float, float]:
    """A bounding box of the world's kind for a shape on a ``w`` x ``h`` canvas."""
    return _shape_box(rng, w, h)


def paint(bg: np.ndarray, alpha: np.ndarray, color: str, rng: np.random.Generator) -> np.ndarray:
    """Composite a ``color`` foreground (slightly jittered) with coverage ``alpha`` over ``bg`` (uint8)."""
    fg = np.asarray(PALETTE[color], dtype=np.float64) + rng.uniform(-12, 12, size=3)
    a = alpha[..., None]
    return np.clip(np.rint(bg * (1 - a) + fg * a), 0, 255).astype(np.uint8)


def pair_for_index(pairs: Sequence[Pair], seed: int, index: int) -> Pair:
    """Balanced: each run of ``len(pairs)`` consecutive indices holds every pair once, in a seeded order."""
    cycle, pos = divmod(index, len(pairs))
    order = np.random.default_rng([seed, cycle, 7]).permutation(len(pairs))
    return pairs[int(order[pos])]


def generate(n: int, seed: int = 0, colors: Sequence[str] = BASE_COLORS, shapes: Sequence[str] = BASE_SHAPES,
             sizes: Sequence[tuple[int, int]] = SIZES, holdout: Sequence[Pair] = (), split: str = "all",
             start: int = 0) -> Iterator[Sample]:
    """Yield samples ``start .. start+n-1`` of the world (deterministic for ``seed``)."""
    check_names(colors, shapes)
    pairs = split_pairs(colors, shapes, holdout, split)
    for i in range(start, start + n):
        color, shape = pair_for_index(pairs, seed, i)
        rng = np.random.default_rng([seed, i])
        size = tuple(sizes[rng.integers(len(sizes))])
        image, kind = render(color, shape, size, rng)
        yield Sample(i, color, shape, image, kind)


# ---------------------------------------------------------------- writing

def write_dataset(samples: Iterable[Sample], out: str, fmt: str = "both", repeats: int = 1,
                  name: str = "shapes", aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Write samples as a DreamBooth folder and/or a fine-tuning metadata JSON; returns what was written.

    Images always go to ``<out>/<repeats>_<name>/<index>.png`` (the DreamBooth layout, so one folder
    serves both formats). ``dreambooth`` adds ``<index>.caption`` beside each image; ``finetune`` writes
    ``<out>/metadata.json`` keyed by file stem: ``{"00000": {"caption": "a red circle"}, ...}``.
    Both are written through temporary names, so an interrupted run leaves no half dataset.
    ``aliases`` renames shapes in captions (``{"heart": "sks"}`` -> ``a red sks``: a trigger word).
    """
    if fmt not in ("dreambooth", "finetune", "both"):
        raise ValueError(f"unknown format {fmt!r} (dreambooth, finetune, both)")
    image_dir = os.path.join(out, f"{repeats}_{name}")
    metadata: dict[str, dict[str, str]] = {}
    with atomic_path(image_dir) as tmp:
        os.makedirs(tmp)
        for s in samples:
            stem = f"{s.index:05d}"
            caption = caption_for(s.color, (aliases or {}).get(s.shape, s.shape))
            s.to_pil().save(os.path.join(tmp, stem + ".png"))
            if fmt in ("dreambooth", "both"):
                with open(os.path.join(tmp, stem + ".caption"), "w", encoding="utf-8") as f:
                    f.write(caption + "\n")
            metadata[stem] = {"caption": caption}
    written = {"image_dir": image_dir}
    if fmt in ("finetune", "both"):
        written["metadata"] = os.path.join(out, "metadata.json")
        write_text_atomic(written["metadata"], json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    return written


def prompt_lines(pairs: Sequence[Pair], per_pair: int = 1, seed: int = 0,
                 sizes: Sequence[tuple[int, int]] = SIZES) -> list[str]:
    """sd-scripts prompt-file lines (``a red circle --w 64 --h 64 --d 7``), ``per_pair`` seeds each,
    cycling through the canvas sizes so every bucket is exercised."""
    lines = []
    for k in range(per_pair):
        for j, (color, shape) in enumerate(pairs):
            w, h = sizes[(j + k) % len(sizes)]
            lines.append(f"{caption_for(color, shape)} --w {w} --h {h} --d {seed + k * len(pairs) + j}")
    return lines
