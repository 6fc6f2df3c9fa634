"""Sample images during FLUX.1 training (flux_train_network.py ``--sample_prompts``).

As sd-scripts' ``flux_train_utils.sample_images``: one image per prompt, sizes floored to multiples of 16 (at least
64), ``sample_steps`` Euler steps of the shifted schedule, dev's embedded guidance 3.5, no true CFG (upstream's
``--l`` defaults to 1.0, so the negative prompt is unused); torch's RNG states are restored afterwards, so sampling
never changes training. The start noise is drawn per image from its seed as gen_img does (flux_pipeline.py), not in
upstream's packed layout, so a seed gives another (equally valid) image than upstream's.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Mapping, Sequence

import torch
from tqdm import tqdm

from library.fileio import atomic_path
from library.sampling.filenames import sample_image_path, timestamp
from library.sampling.flux_pipeline import FluxGenerator
from library.sampling.pipeline import GenSettings, ImageSpec
from library.sampling.training_samples import SEED_RANGE, eval_mode, preserved_rng_state

logger = logging.getLogger(__name__)


def _floor16(value: Any) -> int:
    return max(64, int(value) - int(value) % 16)


@torch.no_grad()
def sample_flux_images_for_training(generator: FluxGenerator, prompt_dicts: Sequence[Mapping[str, Any]], *,
                                    output_dir: str, output_name: str | None, epoch: int | None,
                                    steps: int) -> list[str]:
    """Generate and save one PNG per prompt dict (from ``load_sample_prompts``); returns the written paths."""
    m = generator.models
    os.makedirs(os.path.join(output_dir, "sample"), exist_ok=True)
    paths = []
    with preserved_rng_state(), eval_mode([m.transformer, m.ae, m.clip_l, m.t5xxl]):
        for i, d in enumerate(tqdm(prompt_dicts, desc="sample images", leave=False)):
            seed = d.get("seed")
            spec = ImageSpec(prompt=d.get("prompt", ""),
                             seed=seed if seed is not None else random.SystemRandom().randint(0, SEED_RANGE))
            settings = GenSettings(width=_floor16(d.get("width", 512)), height=_floor16(d.get("height", 512)),
                                   steps=max(1, int(d.get("sample_steps", 20))))
            image = generator.generate([spec], settings)[0]
            path = sample_image_path(output_dir, output_name, int(d.get("enum", i)), epoch=epoch, steps=steps,
                                     seed=seed, ts=timestamp())
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(path)
    return paths
