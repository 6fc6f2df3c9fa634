"""The one recipe runner: the steps every trainer shares, written once (issue 17 item 2).

A trainer is a :class:`Recipe`: what it checks, which models train, what happens once they are loaded, how
the trained part becomes a method object with an optimizer, and how it is saved. :func:`run_recipe` does the
rest in this order, for every trainer: options and seed (``--dry_run`` stops there), data (scanned before any
model loads), accelerator and models, caches, the recipe's training setup, checkpoints and resume, trackers,
sample images, validation / EMA / receipts, the loop and the final save.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from accelerate.utils import set_seed

from library.models.bundle import SDModels
from library.training.loop.checkpointing import Checkpointer, resume_state
from library.training.loop.train_loop import LoopHooks
from library.training.memory.device_memory import park_unused_models
from library.training.objective.latent_memo import set_pixels_repeat
from library.training.runners import accelerate_setup as setup
from library.training.runners import run_lock
from library.training.runners.checks import verify_training_args
from library.training.runners.dry_run import report
from library.training.runners.preflight import preflight
from library.training.runners.run_common import (attach_tokenizers, build_custom_data, build_data,
                                                 cache_latents_if_asked, encode_latents_fn, load_base_models,
                                                 make_sample_hook, tracker_init, train_and_save)
from library.training.runners.run_extras import attach_extras
from library.training.settings import LoopPlan, TrainSettings
from library.training.settings.from_options import build_settings, resolve_options

logger = logging.getLogger(__name__)


@dataclass
class RecipeRun:
    """What the shared steps have built so far, handed to the recipe's hooks. ``args`` are the resolved options
    (runner code reads them for loading and data); ``settings`` is what the method objects receive."""

    args: argparse.Namespace
    settings: TrainSettings
    acc: Any  # accelerate.Accelerator
    wdtype: torch.dtype
    models: SDModels
    group: Any  # library.data.dataset.DatasetGroup


@dataclass
class Training:
    """What a recipe's ``prepare`` returns: the method object, its optimizer and schedule (prepared by the
    accelerator), the step plan, and how a checkpoint is written."""

    method: Any
    optimizer: Any
    lr_scheduler: Any
    plan: LoopPlan
    checkpointer: Checkpointer


class Recipe:
    """What differs between trainers. Subclasses set ``script`` and ``tracker`` and override the hooks."""

    script: str = ""
    tracker: str = ""  # default --log_tracker_name (spec cli-options §4.3)
    sdxl: bool = False
    announce_drawn_seed: bool = False

    def check_options(self, args: argparse.Namespace) -> None:
        """The trainer's own option checks, after the shared ones and before preflight."""

    def trains(self, args: argparse.Namespace) -> tuple[bool, bool]:
        """(U-Net trains, text encoder trains) in full: those stay float32 and are not frozen on loading."""
        return False, False

    def build_data(self, args: argparse.Namespace):
        """The run's dataset group, scanned before any model loads."""
        return build_data(args, self.script, self.sdxl)[0]

    def load_models(self, args: argparse.Namespace, acc, wdtype: torch.dtype):
        """The base models, frozen except what ``trains``, cast and on the device."""
        train_unet, train_te = self.trains(args)
        return load_base_models(args, acc, wdtype, sdxl=self.sdxl, train_unet=train_unet,
                                train_text_encoder=train_te)

    def dry_run(self, args: argparse.Namespace, settings: TrainSettings) -> None:
        """``--dry_run``: the report of what the run would do; loads no model."""
        return report(args, settings.loop, self.script, sdxl=self.sdxl)

    def cache_latents(self, args: argparse.Namespace, group, models, acc) -> None:
        """--cache_latents / --cache_latents_to_disk: every image through the VAE once."""
        cache_latents_if_asked(args, group, models, acc)

    def after_load(self, run: RecipeRun) -> None:
        """Once the models are loaded, before the dataset gets its tokenizers (new tokens go here)."""

    def text_encoder_cache(self, run: RecipeRun) -> Optional[Callable]:
        """Cache text-encoder outputs if asked (after the latents); returns the encoder used, or None."""
        return None

    def prepare(self, run: RecipeRun) -> Training:
        raise NotImplementedError

    def after_resume(self, training: Training, global_step: int) -> None:
        """After the resume state is known (a step-dependent switch, e.g. stopping text-encoder training)."""

    def sample_hook(self, run: RecipeRun) -> Optional[Callable[[Optional[int], int], None]]:
        """Sample images during training, or None when not asked for (the ControlNet trainers add their model)."""
        return make_sample_hook(run.args, run.models, run.acc, run.wdtype, prompt_replacer=self.prompt_replacer())

    def prompt_replacer(self) -> Optional[Callable[[str], str]]:
        """Rewrites sample prompts (Textual Inversion's token strings), or None."""
        return None

    def note(self) -> str:
        """Appended to the log line that starts training."""
        return ""


def run_recipe(parsed: argparse.Namespace, recipe: Recipe) -> Optional[str]:
    """Train with ``recipe``; returns the final file's path (None after ``--dry_run``).

    The parsed options are resolved once (derived values filled in, the parsed object left unchanged) and
    turned into the frozen settings before anything else, in the real run and in ``--dry_run`` alike."""
    args = resolve_options(parsed, recipe.script, recipe.announce_drawn_seed)
    _options(args, recipe)
    settings = build_settings(args, recipe.script)
    if getattr(args, "dry_run", False):
        return recipe.dry_run(args, settings)

    set_seed(settings.loop.seed)
    run = _load(args, settings, recipe)
    encode_text = recipe.text_encoder_cache(run)
    training = recipe.prepare(run)
    acc, models, group = run.acc, run.models, run.group
    state, resumed_from = resume_state(acc, settings.resume, settings.hub)
    recipe.after_resume(training, state.global_step)
    tracker_init(acc, settings.options, recipe.tracker)
    hooks = LoopHooks(sample=recipe.sample_hook(run))
    hooks = attach_extras(args, settings, acc, models, group, training, hooks, encode_latents_fn(models, acc, args),
                          encode_text, resumed_from)  # validation, EMA, receipts
    # after all caching (training and validation): the VAE / text encoders leave the device
    hooks.sample = park_unused_models(models, acc, hooks.sample, latents_cached=bool(args.cache_latents),
                                      text_encoders_cached=encode_text is not None)
    return train_and_save(acc, training, group, args, settings.loop, state, hooks, note=recipe.note())


def _options(args: argparse.Namespace, recipe: Recipe) -> None:
    """Every check that needs no model, then the output-name lock."""
    verify_training_args(args, recipe.script)
    recipe.check_options(args)
    preflight(args, recipe.script)
    run_lock.hold(args)  # one run per output name; --dry_run only checks


def _load(args: argparse.Namespace, settings: TrainSettings, recipe: Recipe) -> RecipeRun:
    """Data (scanned before any model loads), accelerator, models, the recipe's additions, latent cache."""
    custom = bool(getattr(args, "dataset_class", None))  # built with the model's tokenizers, as upstream
    group = None if custom else recipe.build_data(args)
    acc = setup.make_accelerator(args)
    wdtype = setup.weight_dtype(args)
    models = recipe.load_models(args, acc, wdtype)
    if custom:
        group = build_custom_data(args, models, recipe.sdxl)
    run = RecipeRun(args, settings, acc, wdtype, models, group)
    recipe.after_load(run)
    attach_tokenizers(args, group, models)
    recipe.cache_latents(args, group, models, acc)
    if models.vae is not None:
        set_pixels_repeat(models.vae, group.is_latent_cacheable())
    return run
