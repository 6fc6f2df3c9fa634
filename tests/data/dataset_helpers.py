"""Builders for small on-disk datasets used by the dataset, cache and determinism tests."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.config.dataset_blueprint import DatasetParams, SubsetParams
from library.data.dataset import build_dataset_group


@functools.lru_cache(maxsize=None)
def tokenizers(family: str = "sd1") -> list:
    from library.models.tokenizers import load_tokenizers

    return load_tokenizers(family)


def write_image(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB") -> np.ndarray:
    """A random image; returns its pixels."""
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, channels)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def make_folder(root: Path, sizes: list[tuple[int, int]], captions: dict[int, str] | None = None,
                seed: int = 0, prefix: str = "img") -> Path:
    """Images ``<prefix><i>.png`` of the given sizes, caption files for the indices in ``captions``."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        write_image(root / f"{prefix}{i}.png", w, h, seed=seed + i)
        if captions and i in captions:
            (root / f"{prefix}{i}.caption").write_text(captions[i], encoding="utf-8")
    return root


def db_params(subsets: list[SubsetParams], resolution=(64, 64), batch_size: int = 2, enable_bucket: bool = True,
              style: str = "dreambooth", **kw) -> DatasetParams:
    """A DreamBooth-style dataset with small buckets (32-128 px, steps 32)."""
    return DatasetParams(style=style, batch_size=batch_size, resolution=resolution, enable_bucket=enable_bucket,
                         min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, subsets=subsets, **kw)


def build(params: list[DatasetParams], family: str = "sd1", seed: int = 1, max_token_length=None, **kw):
    return build_dataset_group(params, tokenizers(family), seed=seed, max_train_steps=100,
                               max_token_length=max_token_length, **kw)


def fake_encode(images: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: (B,3,H,W) -> (B,4,H/8,W/8) by 8x8 average pooling plus a mean channel."""
    pooled = torch.nn.functional.avg_pool2d(images, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
