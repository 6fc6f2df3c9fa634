"""Read colour and shape back from an image of the shapes world, with no learned model.

Method (each step is chosen to survive the soft, slightly noisy output of a tiny diffusion model):

1. Background: a plane ``a + b*x + c*y`` per channel fitted to the border pixels (twice, dropping the
   worst-fitting 30% so a shape touching the border does not bend it); this absorbs gradients.
2. Foreground: the colour distance to that plane, thresholded with Otsu; the largest blob is kept.
   A soft coverage ``alpha = distance / distance-of-the-core`` keeps anti-aliased and blurred edges, so
   area and moments are sub-pixel accurate (blur conserves them) at 48-80 px.
3. Colour: the median core pixel in CIE Lab, nearest palette colour (lightness weighted down, because a
   tiny model gets brightness wrong sooner than hue).
4. Shape: features that do not change with size, position or an axis stretch -- fill of the bounding
   box, solidity (area / convex hull, a numpy monotone-chain hull), spread and vertical skewness of the
   mass, and how far the boundary's radial profile dips -- classified by the nearest class centre in
   units of the pooled spread, with centres calibrated on freshly drawn (clean and degraded) images.
"""
from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from . import world

FEATURES = ("fill", "solidity", "spread", "skew_y", "dip", "corners", "mirror_y", "mid_row")
EVAL_SHAPES = world.BASE_SHAPES + (world.NEW_SHAPE,)
EVAL_COLORS = world.BASE_COLORS
CALIBRATION_SEED = 1234
CALIBRATION_PER_SHAPE = 40


@dataclass(frozen=True)
class Prediction:
    """What the evaluator sees in one image; confidences are posterior-like, in [0, 1]."""

    color: str | None
    shape: str | None
    color_confidence: float
    shape_confidence: float
    area_fraction: float  # foreground coverage of the image; ~0 means "nothing found"


# ---------------------------------------------------------------- segmentation

def _border_mask(h: int, w: int, width: int = 2) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return m


def background_plane(img: np.ndarray) -> np.ndarray:
    """Per-channel plane fitted robustly to the border pixels, evaluated everywhere (H x W x 3)."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xx.ravel() / w, yy.ravel() / h], 1)
    border = _border_mask(h, w).ravel()
    rows, values = design[border], img.reshape(-1, 3)[border]
    keep = np.ones(len(rows), bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(rows[keep], values[keep], rcond=None)
        err = np.linalg.norm(values - rows @ coef, axis=1)
        keep = err <= np.quantile(err, 0.7)
    return (design @ coef).reshape(h, w, 3)


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Threshold that best splits ``values`` into two groups (between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0) ** 2 / (w0 * (1 - w0))
    return float(centers[int(np.nanargmax(between))])


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (0 = background) by max-label propagation, vectorised: every
    pixel takes the largest label around it until nothing changes (a few dozen passes at 80 px)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        grown = np.max([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def largest_component(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The 8-connected blob of ``mask`` with the largest total ``weight``."""
    labels = label_components(mask)
    if not labels.any():
        return np.zeros_like(mask)
    ids, inv = np.unique(labels[mask], return_inverse=True)
    mass = np.bincount(inv, weights=weight[mask])
    return labels == ids[int(mass.argmax())]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def segment(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft coverage (H x W in [0, 1]) of the main foreground blob, and the boolean core (alpha > 0.5)."""
    img = img.astype(np.float64)
    dist = np.linalg.norm(img - background_plane(img), axis=2)
    thr = max(otsu_threshold(dist), 20.0)  # a floor: a plain image must not split its own noise in two
    blob = largest_component(dist > thr, dist)
    if not blob.any():
        return np.zeros(dist.shape), blob
    full = np.median(dist[blob & (dist >= np.quantile(dist[blob], 0.5))])
    alpha = np.clip(dist / max(full, 1e-6), 0, 1) * _dilate(blob, 2)
    # below half the threshold it is background noise, not an anti-aliased edge
    alpha[dist < thr / 2] = 0
    return alpha, alpha > 0.5


# ---------------------------------------------------------------- geometry

def convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain: the hull of N x 2 points, counter-clockwise, without repeats."""
    pts = [tuple(p) for p in np.unique(np.asarray(points, dtype=np.float64), axis=0).tolist()]
    if len(pts) < 3:
        return np.asarray(pts, dtype=np.float64).reshape(-1, 2)

    def chain(seq: list) -> list:
        out: list = []
        for p in seq:
            # plain floats: np.cross per point is ~50x slower than this
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = chain(pts), chain(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def polygon_area_perimeter(poly: np.ndarray) -> tuple[float, float]:
    if len(poly) < 3:
        return 0.0, 0.0
    x, y = poly[:, 0], poly[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    perim = float(np.linalg.norm(poly - np.roll(poly, -1, axis=0), axis=1).sum())
    return float(area), perim


def _hull_area(core: np.ndarray) -> float:
    """Area of the hull of the core's pixel centres, grown by half a pixel all round (Minkowski sum with
    a disc of radius 0.5), which matches the true outline of the anti-aliased shape."""
    rows = np.nonzero(core.any(1))[0]
    left = core[rows].argmax(1)
    right = core.shape[1] - 1 - core[rows, ::-1].argmax(1)
    # the hull of a pixel set is the hull of each row's two ends
    pts = np.concatenate([np.stack([left, rows], 1), np.stack([right, rows], 1)])
    area, perim = polygon_area_perimeter(convex_hull(pts))
    return area + 0.5 * perim + math.pi / 4


def _radial_dip(core: np.ndarray, cx: float, cy: float, bw: float, bh: float, bins: int = 36) -> float:
    """1 - (low / high radius) of the outline seen from the centroid, in box-normalised coordinates:
    0 for a circle, ~0.3 for a square, ~0.5 for stars and crosses."""
    inner = core.copy()
    inner[1:-1, 1:-1] &= core[:-2, 1:-1] & core[2:, 1:-1] & core[1:-1, :-2] & core[1:-1, 2:]
    ys, xs = np.nonzero(core & ~inner)
    if len(xs) < 8:
        return 0.0
    dx, dy = (xs - cx) / bw, (ys - cy) / bh
    r, ang = np.hypot(dx, dy), np.arctan2(dy, dx)
    idx = ((ang + math.pi) / (2 * math.pi) * bins).astype(int) % bins
    far = np.zeros(bins)
    np.maximum.at(far, idx, r)
    far = far[far > 0]
    return float(1 - np.quantile(far, 0.1) / max(np.quantile(far, 0.9), 1e-6))


def shape_features(alpha: np.ndarray, core: np.ndarray) -> np.ndarray:
    """The ``FEATURES`` vector of a segmented shape (NaN-free; zeros when nothing was found)."""
    area = float(alpha.sum())
    if area < 4 or core.sum() < 4:
        return np.zeros(len(FEATURES))
    bw, bh = float(alpha.max(0).sum()), float(alpha.max(1).sum())
    h, w = alpha.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = float((alpha * xx).sum() / area), float((alpha * yy).sum() / area)
    sx = math.sqrt(float((alpha * (xx - cx) ** 2).sum() / area))
    sy = math.sqrt(float((alpha * (yy - cy) ** 2).sum() / area))
    skew = float((alpha * (yy - cy) ** 3).sum() / area) / max(sy, 1e-6) ** 3
    ys, xs = np.nonzero(core)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    qx, qy = max(1, round((x1 - x0) * 0.2)), max(1, round((y1 - y0) * 0.2))
    corners = np.mean([alpha[y0:y0 + qy, x0:x0 + qx].mean(), alpha[y0:y0 + qy, x1 - qx:x1].mean(),
                       alpha[y1 - qy:y1, x0:x0 + qx].mean(), alpha[y1 - qy:y1, x1 - qx:x1].mean()])
    # mirror top<->bottom about the box middle: blur is symmetric, so this survives a soft image
    box = alpha[y0:y1, x0:x1]
    mirror = float(np.minimum(box, box[::-1]).sum() / max(np.maximum(box, box[::-1]).sum(), 1e-6))
    # coverage of the rows through the centroid: a cross's arm spans the box, a star's waist does not
    band = max(1, round((y1 - y0) * 0.05))
    mid = float(alpha[max(0, round(cy) - band):round(cy) + band + 1, x0:x1].mean())
    return np.array([area / (bw * bh), area / _hull_area(core), (sx / bw + sy / bh) / 2, skew,
                     _radial_dip(core, cx, cy, bw, bh), corners, mirror, mid])


# ---------------------------------------------------------------- degradation (tests and calibration)

def degrade(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Mimic a tiny diffusion model's 64 px output: softened (blur or a down-up resize), noisy,
    slightly off in colour, JPEG-compressed. ``strength`` scales every effect (0 = unchanged)."""
    if strength <= 0:
        return img
    h, w, _ = img.shape
    pil = Image.fromarray(img, "RGB")
    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.4, 1.1) * strength))
    else:
        f = 1 + rng.uniform(0.5, 1.0) * strength  # down by 1.5-2x, back up: the VAE's kind of softness
        pil = pil.resize((max(8, round(w / f)), max(8, round(h / f))), Image.BILINEAR).resize((w, h), Image.BICUBIC)
    arr = np.asarray(pil, dtype=np.float64)
    grey = arr.mean(2, keepdims=True)
    arr = grey + (arr - grey) * (1 - rng.uniform(0, 0.25) * strength)  # desaturate a little
    arr = arr + rng.uniform(-10, 10, size=3) * strength + rng.normal(0, rng.uniform(2, 6) * strength, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=int(rng.integers(40, 80)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


# ---------------------------------------------------------------- colour

def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of sRGB values in 0..255 (any leading shape, last axis 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


LIGHTNESS_WEIGHT = 0.5
COLOR_SIGMA = 12.0  # Lab units: the spread that turns distances into confidences


def classify_color(img: np.ndarray, alpha: np.ndarray, colors: Sequence[str]) -> tuple[str | None, float]:
    """Nearest palette colour to the median of the fully covered pixels, and its confidence."""
    core = alpha >= 0.9 * alpha.max() if alpha.any() else alpha > 0
    if not core.any():
        return None, 0.0
    lab = srgb_to_lab(np.median(img[core].astype(np.float64), axis=0))
    ref = srgb_to_lab(np.array([world.PALETTE[c] for c in colors], dtype=np.float64))
    wts = np.array([LIGHTNESS_WEIGHT, 1.0, 1.0])
    d2 = (((ref - lab) * wts) ** 2).sum(1) / COLOR_SIGMA ** 2
    return colors[int(d2.argmin())], _posterior(d2)


def _posterior(d2: np.ndarray) -> float:
    """Confidence of the nearest class: softmax of -d^2/2 (a Gaussian posterior with equal priors)."""
    z = np.exp(-(d2 - d2.min()) / 2)
    return float(z.max() / z.sum())


# ---------------------------------------------------------------- shape

@functools.lru_cache(maxsize=None)
def calibration(shapes: tuple[str, ...] = world.ALL_SHAPES) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Class centres and the pooled within-class spread of the features, measured on freshly drawn
    images (half clean, half degraded), deterministic. Cached: it takes about a second."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    feats: dict[str, list[np.ndarray]] = {s: [] for s in shapes}
    for shape in shapes:
        for k in range(CALIBRATION_PER_SHAPE):
            color = world.BASE_COLORS[k % len(world.BASE_COLORS)]
            img, _ = world.render(color, shape, world.SIZES[k % len(world.SIZES)], rng)
            if k % 2:
                img = degrade(img, rng, strength=rng.uniform(0.3, 1.0))
            feats[shape].append(shape_features(*segment(img)))
    centres = {s: np.mean(v, axis=0) for s, v in feats.items()}
    resid = np.concatenate([np.asarray(v) - centres[s] for s, v in feats.items()])
    # floor: a feature that never varies in calibration must not become infinitely strict
    spread = np.maximum(resid.std(axis=0), 0.02)
    return centres, spread


def classify_shape(features: np.ndarray, shapes: Sequence[str]) -> tuple[str | None, float]:
    """Nearest class centre (in units of the pooled spread) among ``shapes``, and its confidence."""
    if not features.any():
        return None, 0.0
    centres, spread = calibration(tuple(sorted(set(world.ALL_SHAPES) | set(shapes))))
    d2 = np.array([(((features - centres[s]) / spread) ** 2).sum() for s in shapes])
    return shapes[int(d2.argmin())], _posterior(d2)


def predict(img: np.ndarray | Image.Image, colors: Sequence[str] = EVAL_COLORS,
            shapes: Sequence[str] = EVAL_SHAPES) -> Prediction:
    """Colour and shape of the main object of an RGB image (array H x W x 3 or PIL image)."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    alpha, core = segment(arr)
    color, c_conf = classify_color(arr, alpha, colors)
    shape, s_conf = classify_shape(shape_features(alpha, core), shapes)
    return Prediction(color, shape, c_conf, s_conf, float(alpha.sum() / alpha.size))


# ---------------------------------------------------------------- prompts and folders

def parse_prompt(prompt: str, colors: Sequence[str] = tuple(world.PALETTE), shapes: Sequence[str] = world.ALL_SHAPES,
                 aliases: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """The colour and shape a prompt asks for (``"a red circle --w 64"`` -> ``("red", "circle")``).

    ``aliases`` maps a trigger word to a shape (``{"sks": "heart"}``) for concepts a LoRA teaches.
    Options after `` --`` (sd-scripts prompt syntax) are ignored.
    """
    text = prompt.split(" --")[0].lower()
    words = [w.strip(".,;:!()[]{}") for w in text.split()]
    color = next((w for w in words if w in colors), None)
    shape = next((w for w in words if w in shapes), None)
    if aliases:
        shape = next((aliases[w] for w in words if w in aliases), shape)
    return color, shape


def prompt_of(path: str) -> str | None:
    """The prompt stored with an image: PNG text ``prompt`` (gen_img), else the first line of A1111
    ``parameters``, else a caption file beside it (``.caption`` / ``.txt``)."""
    with Image.open(path) as im:
        text = getattr(im, "text", None) or {}
        if text.get("prompt"):
            return text["prompt"]
        if text.get("parameters"):
            return text["parameters"].splitlines()[0]
    stem = os.path.splitext(path)[0]
    for ext in (".caption", ".txt"):
        if os.path.exists(stem + ext):
            with open(stem + ext, encoding="utf-8") as f:
                return f.readline().strip()
    return None


@dataclass(frozen=True)
class ImageResult:
    path: str
    prompt: str
    want_color: str | None
    want_shape: str | None
    prediction: Prediction

    @property
    def color_ok(self) -> bool:
        return self.prediction.color == self.want_color

    @property
    def shape_ok(self) -> bool:
        return self.prediction.shape == self.want_shape

    @property
    def ok(self) -> bool:
        return self.color_ok and self.shape_ok


def evaluate_images(items: Sequence[tuple[str, str]], colors: Sequence[str] = EVAL_COLORS,
                    shapes: Sequence[str] = EVAL_SHAPES, aliases: dict[str, str] | None = None) -> list[ImageResult]:
    """Judge each ``(image path, prompt)``: the classifier picks among ``colors`` x ``shapes``."""
    results = []
    for path, prompt in items:
        want_c, want_s = parse_prompt(prompt, aliases=aliases)
        with Image.open(path) as im:
            pred = predict(im, colors, shapes)
        results.append(ImageResult(path, prompt, want_c, want_s, pred))
    return results


def summarize(results: Sequence[ImageResult]) -> dict:
    """Colour, shape and prompt accuracy overall and per prompt (a prompt is right when both are)."""
    n = max(len(results), 1)
    per_prompt: dict[str, list[int]] = {}
    for r in results:
        key = " ".join(filter(None, (r.want_color, r.want_shape))) or r.prompt
        per_prompt.setdefault(key, []).append(int(r.ok))
    return {
        "n": len(results),
        "color_accuracy": sum(r.color_ok for r in results) / n,
        "shape_accuracy": sum(r.shape_ok for r in results) / n,
        "prompt_accuracy": sum(r.ok for r in results) / n,
        "per_prompt": {k: sum(v) / len(v) for k, v in sorted(per_prompt.items())},
    }
