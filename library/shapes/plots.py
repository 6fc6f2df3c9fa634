"""Small PNG figures drawn with Pillow: line charts and image grids (no matplotlib dependency).

The demo and ``bench/quality.py`` need a loss curve, an accuracy-vs-steps chart and a labelled image
grid; Pillow is already required, so a hundred lines here beat a plotting library in requirements.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

# Distinct colours for up to eight series (colour-blind friendly, Okabe-Ito).
SERIES_COLOURS = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
                  (0, 0, 0), (240, 228, 66))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        if t >= lo - step * 1e-6:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, title: str = "",
               xlabel: str = "", ylabel: str = "", y_range: tuple[float, float] | None = None,
               size: tuple[int, int] = (640, 400), markers: bool = False, faint: Sequence[str] = ()) -> Path:
    """Write a line chart of ``{label: (xs, ys)}`` to ``path`` (PNG) and return the path.

    Series named in ``faint`` are drawn thin and pale (raw, noisy values behind their average)."""
    w, h = size
    # several series: the legend gets its own column right of the plot, so it never hides a line
    left, right, top, bottom = 64, 16 if len(series) < 2 else 150, 32 if title else 12, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys if math.isfinite(y)]
    if not xs_all or not ys_all:
        raise ValueError("line_chart: no finite points to draw")
    x_lo, x_hi = min(xs_all), max(xs_all)
    y_lo, y_hi = y_range if y_range else (min(ys_all), max(ys_all))
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1
    pw, ph = w - left - right, h - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x_lo) / (x_hi - x_lo) * pw, top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    for t in _nice_ticks(y_lo, y_hi):
        _, y = px(x_lo, t)
        d.line([(left, y), (left + pw, y)], fill=(230, 230, 230))
        d.text((left - 6, y), _fmt(t), fill="black", font=font, anchor="rm")
    for t in _nice_ticks(x_lo, x_hi, 6):
        x, _ = px(t, y_lo)
        d.line([(x, top + ph), (x, top + ph + 4)], fill="black")
        d.text((x, top + ph + 6), _fmt(t), fill="black", font=font, anchor="ma")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    if title:
        d.text((w / 2, 8), title, fill="black", font=font, anchor="ma")
    if xlabel:
        d.text((left + pw / 2, h - 14), xlabel, fill="black", font=font, anchor="ma")
    if ylabel:
        d.text((4, top - 2 if not title else 8), ylabel, fill="black", font=font, anchor="la")
    for i, (label, (xs, ys)) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        if label in faint:
            colour = tuple(c + (255 - c) * 3 // 5 for c in colour)
        pts = [px(x, min(max(y, y_lo), y_hi)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=1 if label in faint else 2)
        if markers or len(pts) == 1:
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if len(series) > 1:
            ly = top + 8 + 16 * i
            d.line([(left + pw + 10, ly), (left + pw + 30, ly)], fill=colour, width=3)
            d.text((left + pw + 36, ly), label, fill="black", font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


VERDICT_OK = (0, 150, 60)  # caption colour of a verdict that matches the prompt
VERDICT_BAD = (210, 30, 30)
CAPTION_H = 14


def image_grid(rows: Sequence[Sequence[Image.Image]], path: str | Path, *, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), cell: int = 96,
               captions: Sequence[Sequence[tuple[str, bool]]] = ()) -> Path:
    """Paste images into a labelled grid (each image fitted into a ``cell`` square) and save it as PNG.

    ``captions`` (one ``(text, ok)`` per image, row by row) are written under each image, green when
    ``ok`` (the verdict matches the prompt), red otherwise."""
    font = ImageFont.load_default()
    label_w = 8 + max((int(font.getlength(t)) for t in row_labels), default=0) if row_labels else 0
    label_h = 16 if col_labels else 0
    cap_h = CAPTION_H if captions else 0
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + n_cols * (cell + 2), label_h + len(rows) * (cell + 2 + cap_h)), "white")
    d = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels):
        d.text((label_w + c * (cell + 2) + cell / 2, 2), text, fill="black", font=font, anchor="ma")
    for r, row_caps in enumerate(captions):
        for c, (text, ok) in enumerate(row_caps):
            x, y = label_w + c * (cell + 2), label_h + r * (cell + 2 + cap_h) + cell + 1
            d.rectangle([x, y, x + cell - 1, y + cap_h - 2], fill=VERDICT_OK if ok else VERDICT_BAD)
            d.text((x + cell / 2, y + cap_h / 2 - 1), text, fill="white", font=font, anchor="mm")
    for r, images in enumerate(rows):
        y = label_h + r * (cell + 2 + cap_h)
        if r < len(row_labels):
            d.text((4, y + cell / 2), row_labels[r], fill="black", font=font, anchor="lm")
        for c, im in enumerate(images):
            im = im.convert("RGB")
            scale = cell / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
            x = label_w + c * (cell + 2)
            grid.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
