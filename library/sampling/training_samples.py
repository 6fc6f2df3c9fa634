"""Sample images during training (spec generation §4): the entry the training loop calls.

Semantics of sd-scripts' `sample_images`: training sampler mapping (`for_training=True`: Diffusers defaults,
clip_sample on, unknown names -> DDIM), the LPW pipelines' prompt encoder (225 tokens, EOS padding for SD1/2),
sizes floored to ×8 (min 64), one image per prompt, no PNG metadata, torch RNG states restored afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from library.errors import UserError
from library.fileio import atomic_path
from library.models.bundle import SDModels
from library.sampling.controlnet import LoadedControlNet
from library.sampling.controlnet_lllite import ControlNetLLLite
from library.sampling.filenames import sample_image_path, timestamp
from library.sampling.pipeline import GenSettings, ImageSpec, Pipeline

logger = logging.getLogger(__name__)

SEED_RANGE = 2**32 - 1


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Save torch's CPU (and CUDA) RNG states and restore them afterwards, so sampling never shifts training."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Put modules in eval mode (no dropout) and give back their training flags afterwards."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def _floor8(value: Any) -> int:
    return max(64, int(value) - int(value) % 8)


def sample_images_for_training(models: SDModels, prompt_dicts: Sequence[Mapping[str, Any]], *, output_dir: str,
                               output_name: str | None, epoch: int | None, steps: int, default_sampler: str,
                               v_parameterization: bool, clip_skip: int | None, device: torch.device | str,
                               dtype: torch.dtype | None, ti_replacer: Callable[[str], str] | None = None,
                               control_nets: Sequence[LoadedControlNet] = (),
                               lllites: Sequence[ControlNetLLLite] = ()) -> list[str]:
    """Generate one image per prompt dict (from `load_sample_prompts`) and return the written paths. spec §4.

    `epoch` given -> `..._e{epoch:06d}_...` names (also `e000000` before training), else `{steps:06d}`.
    A dict's `seed` None draws a fresh nondeterministic seed (not part of the file name). `dtype` is the
    autocast dtype for the U-Net (mixed precision); `ti_replacer` rewrites TI token strings in both prompts.
    `control_nets` / `lllites` (ControlNet trainers): the model being trained, guided by each prompt's
    `controlnet_image` (`--cn`); prompts without one are sampled without it.
    """
    pipe = Pipeline(models, device, clip_skip=clip_skip, for_training=True, autocast_dtype=dtype, progress=False,
                    v_parameterization=v_parameterization, control_nets=control_nets, lllites=lllites)
    os.makedirs(os.path.join(output_dir, "sample"), exist_ok=True)
    paths = []
    modules = [models.unet, models.vae, *models.text_encoders, *(c.model for c in control_nets)]
    with preserved_rng_state(), eval_mode(modules):
        for i, d in enumerate(tqdm(prompt_dicts, desc="sample images", leave=False)):
            paths.append(_sample_one(pipe, d, i, output_dir, output_name, epoch, steps, default_sampler, ti_replacer))
    return paths


def _sample_one(pipe: Pipeline, d: Mapping[str, Any], index: int, output_dir: str, output_name: str | None,
                epoch: int | None, steps: int, default_sampler: str, ti_replacer: Callable[[str], str] | None) -> str:
    replace_ti = ti_replacer or (lambda s: s)
    hint = _control_image(pipe, d, index)
    seed = d.get("seed")
    spec = ImageSpec(prompt=replace_ti(d.get("prompt", "")), negative_prompt=replace_ti(d.get("negative_prompt") or ""),
                     seed=seed if seed is not None else random.SystemRandom().randint(0, SEED_RANGE),
                     control_images=(hint,) if hint is not None else None)
    settings = GenSettings(width=_floor8(d.get("width", 512)), height=_floor8(d.get("height", 512)),
                           steps=max(1, min(1000, int(d.get("sample_steps", 30)))), scale=float(d.get("scale", 7.5)),
                           sampler=d.get("sample_sampler") or default_sampler)
    image = pipe.generate([spec], settings)[0]
    path = sample_image_path(output_dir, output_name, int(d.get("enum", index)), epoch=epoch, steps=steps, seed=seed,
                             ts=timestamp())
    with atomic_path(path) as tmp:  # a full disk never leaves a half-written image
        image.save(tmp, format="PNG")
    return path


def _control_image(pipe: Pipeline, d: Mapping[str, Any], index: int) -> Image.Image | None:
    """The prompt's `controlnet_image` (`--cn`) when a ControlNet (-LLLite) trains, else None (with a warning if
    one was given: only the ControlNet trainers sample with a hint)."""
    path = d.get("controlnet_image")
    if not path:
        return None
    if not pipe.control_nets and not pipe.lllites:
        logger.warning("sample prompt %d: controlnet_image is used only by the ControlNet trainers; sampled without "
                       "it", index)
        return None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise UserError(f"sample prompt {index}: controlnet_image {path}: cannot read the image ({e})") from None
