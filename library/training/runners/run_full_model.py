"""train_db.py / fine_tune.py as one recipe of the shared runner (recipe.py): a whole model trains.

The two scripts differ only by their checks, by whether the text encoder trains, and by the method
object (``methods.dreambooth`` / ``methods.finetune``); ``run_dreambooth`` and ``run_finetune`` build
their :class:`FullModelRecipe`.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Optional

import torch

from library.formats.modelspec import modelspec_from_options, trained_resolution
from library.models.bundle import SDModels
from library.training.loop.checkpointing import Checkpointer
from library.training.methods.full_model import FullModelMethod
from library.training.methods.full_model_saving import FullModelSaver, resolve_save_format
from library.training.runners import accelerate_setup as setup
from library.training.runners.recipe import Recipe, RecipeRun, Training, run_recipe
from library.training.runners.run_common import optimizer_and_schedule
from library.training.runners.sharded import ShardedWeights, check_sharded_options, prepare_bundle, sharding
from library.training.settings import LoopPlan, TrainSettings

logger = logging.getLogger(__name__)


class FullModelRecipe(Recipe):
    """train_db.py / fine_tune.py: the U-Net (and the text encoder, when asked) train in full. The scripts
    differ by their checks (``check``), by the method object and by ``after_load``."""

    announce_drawn_seed = True

    def __init__(self, script: str, tracker: str,
                 make_method: Callable[[SDModels, TrainSettings, object, torch.dtype], FullModelMethod],
                 train_text_encoder: Callable[[argparse.Namespace], bool],
                 check: Optional[Callable[[argparse.Namespace], None]] = None,
                 after_load: Optional[Callable[[SDModels, argparse.Namespace], None]] = None):
        self.script, self.tracker = script, tracker
        self._make_method, self._train_te, self._check, self._after_load = (make_method, train_text_encoder, check,
                                                                            after_load)
        self.train_text_encoder = False

    def check_options(self, args: argparse.Namespace) -> None:
        if self._check:
            self._check(args)
        check_sharded_options(args)
        self.train_text_encoder = self._train_te(args)

    def trains(self, args: argparse.Namespace) -> tuple[bool, bool]:
        return True, self.train_text_encoder

    def after_load(self, run: RecipeRun) -> None:
        if self._after_load:
            self._after_load(run.models, run.args)

    def prepare(self, run: RecipeRun) -> Training:
        args, acc, models, train_te = run.args, run.acc, run.models, self.train_text_encoder
        unet, te = models.unet, models.text_encoders[0]
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            te.gradient_checkpointing_enable()
        if args.full_fp16:  # --full_bf16 is parsed but unused by train_db / fine_tune (spec pitfall 12)
            unet.to(run.wdtype)
            if train_te:
                te.to(run.wdtype)
        groups = param_groups(models, train_te, args.learning_rate, args.learning_rate_te)
        optimizer, lr_sched, plan, _ = optimizer_and_schedule(args, run.settings.loop, groups, run.group, acc)
        method = self._make_method(models, run.settings, acc, run.wdtype)
        weights = None
        if sharding(acc):  # FSDP / DeepSpeed: the trained models as one prepared bundle
            parts = {"unet": unet, **({"text_encoder": te} if train_te else {})}
            parts, bundle, optimizer, lr_sched, weights = prepare_bundle(acc, parts, optimizer, lr_sched)
            method.attach(parts["unet"], parts.get("text_encoder"), bundle=bundle)
        elif train_te:
            unet, te, optimizer, lr_sched = acc.prepare(unet, te, optimizer, lr_sched)
            method.attach(unet, te)
        else:
            unet, optimizer, lr_sched = acc.prepare(unet, optimizer, lr_sched)
            method.attach(unet, None)
        return Training(method, optimizer, lr_sched, plan, whole_model_checkpointer(args, run.settings, acc, models,
                                                                                           plan, run.group, weights))

    def after_resume(self, training: Training, global_step: int) -> None:
        training.method.sync_step(global_step)  # --stop_text_encoder_training 0, or a resume past the stop step

    def note(self) -> str:
        return ", text encoder " + ("trained" if self.train_text_encoder else "frozen")


def run(args: argparse.Namespace, recipe: FullModelRecipe) -> str:
    """Train the U-Net (and text encoder) in full; returns the path of the final model."""
    return run_recipe(args, recipe)


def param_groups(models: SDModels, train_text_encoder: bool, learning_rate: float,
                 learning_rate_te: Optional[float]) -> list:
    """sd-scripts' groups: one list of every trained parameter, or [U-Net @ lr, TE @ lr_te] with --learning_rate_te."""
    unet_params = list(models.unet.parameters())
    if not train_text_encoder:
        return unet_params
    te_params = list(models.text_encoders[0].parameters())
    if learning_rate_te is None:
        return unet_params + te_params
    return [{"params": unet_params, "lr": learning_rate}, {"params": te_params, "lr": learning_rate_te}]


def whole_model_checkpointer(args: argparse.Namespace, settings: TrainSettings, acc, models: SDModels,
                             plan: LoopPlan, group, sharded: Optional[ShardedWeights] = None) -> Checkpointer:
    """Whole-model files in the format of spec cli-options §7, with modelspec for .safetensors (§b.3); the
    modelspec resolution is the one trained (a dataset config's own), as for LoRA files. ``sharded``: the
    trained models' weights are gathered on every process before each save, and written by the main one."""
    fmt = resolve_save_format(args.save_model_as, args.use_safetensors,
                              os.path.isfile(args.pretrained_model_name_or_path))
    saver = FullModelSaver(models, args.pretrained_model_name_or_path, fmt, setup.save_dtype(args),
                           lambda: modelspec_from_options(settings.options, models.family, "checkpoint",
                                                          resolution=trained_resolution(group)))
    checkpointer = Checkpointer(settings.saving, acc, saver, fmt.ext, plan.num_epochs, plan.max_train_steps,
                                settings.hub)
    if sharded is not None:
        checkpointer.before_model_save.append(sharded.gather)
        saver.models_to_save = lambda: sharded.models_for_saving(models)
    return checkpointer
