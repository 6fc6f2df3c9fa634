"""Helpers for the ControlNet / ControlNet-LLLite trainer tests: paired image / conditioning-image folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_pairs(root: Path, n: int = 3, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """``root/images`` (a square on a plain background, with captions) and ``root/cond`` (the square's outline
    as a white-on-black hint image, the same stem); returns (images, cond)."""
    images, cond = root / "images", root / "cond"
    images.mkdir(parents=True, exist_ok=True)
    cond.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        x0, y0 = rng.integers(0, size // 2, 2)
        a[y0:y0 + size // 2, x0:x0 + size // 2] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(images / f"{i}.png")
        (images / f"{i}.caption").write_text(f"a square, number {i}", encoding="utf-8")
        h = np.zeros((size, size, 3), np.uint8)
        h[y0:y0 + size // 2, x0:x0 + size // 2] = 255
        Image.fromarray(h).save(cond / f"{i}.png")
    return images, cond


def hint_prompts(path: Path, hint: Path) -> list[str]:
    """A prompt file with the same prompt and seed twice, the first with ``--cn hint``; returns the options that
    sample both after step 2."""
    path.write_text(f"a square --w 64 --h 64 --s 2 --d 3 --cn {hint}\na square --w 64 --h 64 --s 2 --d 3\n",
                    encoding="utf-8")
    return ["--sample_prompts", str(path), "--sample_every_n_steps", "2"]


def samples_differ(folder: Path) -> bool:
    """The two sample images of ``hint_prompts`` (with and without the hint) differ somewhere."""
    a, b = sorted(folder.glob("*.png"))
    return bool(np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max() > 0)
