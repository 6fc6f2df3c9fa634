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
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from library.models.bundle import SDModels
from library.training.loop.checkpointing import Checkpointer, resume_state
from library.training.loop.train_loop import LoopHooks
from library.training.memory.device_memory import park_unused_models
from library.training.runners import accelerate_setup as setup
from library.training.runners import run_lock
from library.training.runners.checks import verify_training_args
from library.training.runners.preflight import preflight
from library.training.runners.run_common import (attach_tokenizers, build_data, cache_latents_if_asked,
                                                 encode_latents_fn, load_base_models, make_sample_hook, tracker_init,
                                                 train_and_save)
from library.training.runners.run_extras import attach_extras
from library.training.settings import LoopPlan

logger = logging.getLogger(__name__)


@dataclass
class RecipeRun:
    """What the shared steps have built so far, handed to the recipe's hooks."""

    args: argparse.Namespace
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

    def after_load(self, run: RecipeRun) -> None:
        """Once the models are loaded, before the dataset gets its tokenizers (new tokens go here)."""

    def text_encoder_cache(self, run: RecipeRun) -> Optional[Callable]:
        """Cache text-encoder outputs if asked (after the latents); returns the encoder used, or None."""
        return None

    def prepare(self, run: RecipeRun) -> Training:
        raise NotImplementedError

    def after_resume(self, training: Training, global_step: int) -> None:
        """After the resume state is known (a step-dependent switch, e.g. stopping text-encoder training)."""

    def prompt_replacer(self) -> Optional[Callable[[str], str]]:
        """Rewrites sample prompts (Textual Inversion's token strings), or None."""
        return None

    def note(self) -> str:
        """Appended to the log line that starts training."""
        return ""


def run_recipe(args: argparse.Namespace, recipe: Recipe) -> Optional[str]:
    """Train with ``recipe``; returns the final file's path (None after ``--dry_run``)."""
    _options(args, recipe)
    if getattr(args, "dry_run", False):
        from library.training.runners.dry_run import report

        return report(args, recipe.script, sdxl=recipe.sdxl)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    run = _load(args, recipe)
    encode_text = recipe.text_encoder_cache(run)
    training = recipe.prepare(run)
    acc, models, group = run.acc, run.models, run.group
    state = resume_state(acc, args)
    recipe.after_resume(training, state.global_step)
    tracker_init(acc, args, recipe.tracker)
    hooks = LoopHooks(sample=make_sample_hook(args, models, acc, run.wdtype, prompt_replacer=recipe.prompt_replacer()))
    hooks = attach_extras(args, acc, recipe.script, models, group, training.method, training.checkpointer, hooks,
                          encode_latents_fn(models, acc, args), encode_text)  # validation, EMA, receipts
    # after all caching (training and validation): the VAE / text encoders leave the device
    hooks.sample = park_unused_models(args, models, acc, hooks.sample, text_encoders_cached=encode_text is not None)
    return train_and_save(acc, training.method, group, args, training.optimizer, training.lr_scheduler,
                          training.plan, training.checkpointer, state, hooks, note=recipe.note())


def _options(args: argparse.Namespace, recipe: Recipe) -> None:
    """Every check that needs no model, then the output-name lock and the seed."""
    verify_training_args(args, recipe.script)
    recipe.check_options(args)
    preflight(args, recipe.script)
    run_lock.hold(args)  # one run per output name; --dry_run only checks
    if args.seed is None:
        # sd-scripts leaves D/F/T unseeded; a drawn seed keeps that randomness and makes the run repeatable
        args.seed = random.randint(0, 2**32 - 1)
        if recipe.announce_drawn_seed:
            logger.info("no --seed given: using %d", args.seed)


def _load(args: argparse.Namespace, recipe: Recipe) -> RecipeRun:
    """Data (scanned before any model loads), accelerator, models, the recipe's additions, latent cache."""
    group, _ = build_data(args, recipe.script, recipe.sdxl)
    acc = setup.make_accelerator(args)
    wdtype = setup.weight_dtype(args)
    train_unet, train_te = recipe.trains(args)
    models = load_base_models(args, acc, wdtype, sdxl=recipe.sdxl, train_unet=train_unet,
                              train_text_encoder=train_te)
    run = RecipeRun(args, acc, wdtype, models, group)
    recipe.after_load(run)
    attach_tokenizers(args, group, models)
    cache_latents_if_asked(args, group, models, acc)
    return run
