"""train_db.py / fine_tune.py: numbered steps from parsed options to a saved whole model.

The two scripts differ only by their checks, by whether the text encoder trains, and by the method
object (``methods.dreambooth`` / ``methods.finetune``); ``run_dreambooth`` and ``run_finetune`` decide
those and call :func:`run`.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from library.formats.modelspec import modelspec_from_args, trained_resolution
from library.models.bundle import SDModels
from library.training.loop.checkpointing import Checkpointer, resume_state
from library.training.loop.train_loop import LoopHooks, LoopPlan
from library.training.memory.device_memory import park_unused_models
from library.training.methods.full_model import FullModelMethod
from library.training.methods.full_model_saving import FullModelSaver, resolve_save_format
from library.training.runners import accelerate_setup as setup
from library.training.runners import run_lock
from library.training.runners.checks import verify_training_args
from library.training.runners.preflight import preflight
from library.training.runners.run_common import (attach_tokenizers, build_data, cache_latents_if_asked,
                                                 encode_latents_fn, load_base_models, make_sample_hook,
                                                 optimizer_and_schedule, tracker_init, train_and_save)
from library.training.runners.run_extras import attach_extras

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FullModelScript:
    """What differs between train_db.py and fine_tune.py at the orchestration level."""

    name: str  # script name for the dataset-config rules and checks
    tracker: str  # default --log_tracker_name (spec cli-options §4.3)
    make_method: Callable[[SDModels, argparse.Namespace, object, torch.dtype], FullModelMethod]
    after_load: Optional[Callable[[SDModels, argparse.Namespace], None]] = None


def run(args: argparse.Namespace, script: FullModelScript, train_text_encoder: bool) -> str:
    """Train the U-Net (and text encoder) in full; returns the path of the final model."""
    # 1. options and seed
    verify_training_args(args, script.name)
    preflight(args, script.name)
    run_lock.hold(args)  # one run per output name; --dry_run only checks
    if args.seed is None:
        # sd-scripts leaves D/F unseeded; a drawn seed keeps that randomness and makes the run repeatable
        args.seed = random.randint(0, 2**32 - 1)
        logger.info("no --seed given: using %d", args.seed)
    if getattr(args, "dry_run", False):
        from library.training.runners.dry_run import report

        return report(args, script.name)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    # 2. data (scanned before any model loads), accelerator, models
    group, _ = build_data(args, script.name, sdxl=False)
    acc = setup.make_accelerator(args)
    wdtype = setup.weight_dtype(args)
    models = load_base_models(args, acc, wdtype, sdxl=False, train_unet=True, train_text_encoder=train_text_encoder)
    if script.after_load:
        script.after_load(models, args)
    attach_tokenizers(args, group, models)
    cache_latents_if_asked(args, group, models, acc)
    # 3. what trains
    unet, te = models.unet, models.text_encoders[0]
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        te.gradient_checkpointing_enable()
    if args.full_fp16:  # --full_bf16 is parsed but unused by train_db / fine_tune (spec pitfall 12)
        unet.to(wdtype)
        if train_text_encoder:
            te.to(wdtype)
    groups = param_groups(models, train_text_encoder, args.learning_rate, args.learning_rate_te)
    # 4. optimizer, scheduler, prepare
    optimizer, lr_sched, plan, _ = optimizer_and_schedule(args, groups, group, acc)
    if train_text_encoder:
        unet, te, optimizer, lr_sched = acc.prepare(unet, te, optimizer, lr_sched)
    else:
        unet, optimizer, lr_sched = acc.prepare(unet, optimizer, lr_sched)
    # 5. method, saving, sampling, resume
    method = script.make_method(models, args, acc, wdtype)
    method.attach(unet, te if train_text_encoder else None)
    checkpointer = _checkpointer(args, acc, models, plan, group)
    state = resume_state(acc, args)
    method.sync_step(state.global_step)  # --stop_text_encoder_training 0, or a resume past the stop step
    tracker_init(acc, args, script.tracker)
    hooks = LoopHooks(sample=make_sample_hook(args, models, acc, wdtype))
    hooks = attach_extras(args, acc, script.name, models, group, method, checkpointer, hooks,
                          encode_latents_fn(models, acc, args))  # validation, EMA, receipts
    hooks.sample = park_unused_models(args, models, acc, hooks.sample)  # after all caching
    # 6. train, final save
    return train_and_save(acc, method, group, args, optimizer, lr_sched, plan, checkpointer, state, hooks,
                          note=", text encoder " + ("trained" if train_text_encoder else "frozen"))


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


def _checkpointer(args: argparse.Namespace, acc, models: SDModels, plan: LoopPlan, group) -> Checkpointer:
    """Whole-model files in the format of spec cli-options §7, with modelspec for .safetensors (§b.3); the
    modelspec resolution is the one trained (a dataset config's own), as for LoRA files."""
    fmt = resolve_save_format(args.save_model_as, args.use_safetensors,
                              os.path.isfile(args.pretrained_model_name_or_path))
    saver = FullModelSaver(models, args, fmt, setup.save_dtype(args),
                           lambda: modelspec_from_args(args, models.family, "checkpoint",
                                                       resolution=trained_resolution(group)))
    return Checkpointer(args, acc, saver, fmt.ext, plan.num_epochs)
