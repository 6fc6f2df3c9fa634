"""Wiring of the features beyond sd-scripts into any trainer's run (docs/beyond-sd-scripts.md).

A runner calls :func:`attach_extras` once, after its checkpointer exists and ``--resume`` was loaded,
and hands the returned hooks to the loop: validation loss, the EMA (updates, ``-ema`` files, state,
``--sample_with_ema``) and run receipts then work the same for every trainer. The non-finite guard and
the throughput watch live in the loop itself; ``--dry_run`` is :func:`library.training.runners.dry_run.report`.
"""
from __future__ import annotations

import argparse
import logging
from typing import Callable, Optional

import torch

from library.config.dataset_blueprint import dataset_params_from_args
from library.data.dataset import build_dataset_group, scan_mode
from library.data.latent_cache import cache_latents
from library.data.te_cache import cache_text_encoder_outputs
from library.training.extras.ema import EMA, ema_from_settings, ema_name
from library.training.extras.receipts import ReceiptWriter, build_receipt, dataset_fingerprint
from library.training.extras.validation import Validator
from library.training.loop.train_loop import LoopHooks
from library.training.settings import TrainSettings

logger = logging.getLogger(__name__)


class EmaSaver:
    """Checkpointer companion: the EMA weights saved beside each model as ``<stem>-ema<ext>``, through the
    method's own save function, so format and metadata are the model's."""

    def __init__(self, ema: EMA, save_model: Callable[[str, str, int, int], None]):
        self.ema, self.save_model = ema, save_model

    def after_save(self, stem: str, ext: str, event: str, epoch: int, global_step: int) -> None:
        with self.ema.applied():
            self.save_model(ema_name(stem) + ext, event, epoch, global_step)

    def paths(self, stem: str, ext: str) -> list[str]:
        return [ema_name(stem) + ext]


def attach_extras(args: argparse.Namespace, settings: TrainSettings, acc, models, group, training,
                  hooks: Optional[LoopHooks] = None, encode_latents: Optional[Callable] = None,
                  encode_text: Optional[Callable] = None, resumed_from: Optional[str] = None) -> LoopHooks:
    """Add validation, EMA and receipts to ``hooks`` (a new LoopHooks when None) and to the checkpointer of
    ``training`` (the recipe's ``Training``).

    ``encode_latents`` / ``encode_text``: the runner's encoders for the latent and (SDXL) text-encoder output
    caches, so the validation images are cached the way the training images are. ``resumed_from``: the local
    state folder of ``--resume`` (the EMA is restored from it)."""
    hooks = hooks if hooks is not None else LoopHooks()
    method, checkpointer = training.method, training.checkpointer
    # 1. validation set and validator
    vgroup = build_validation_group(args, settings.script, models, group, acc, training.plan.max_train_steps,
                                    encode_latents, encode_text)
    if vgroup is not None:
        hooks.validation = Validator(vgroup, acc, settings.validation)
        logger.info("validation: %d images in %d batches", sum(len(d.images) for d in vgroup.datasets), len(vgroup))
    else:
        unused = [f"--{k}" for k in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
                                     "validation_seed") if getattr(args, k, None) is not None]
        if unused:
            logger.warning("%s given but no validation images: set validation_split", ", ".join(unused))
    # 2. EMA: updated after each step, saved beside each model and into each state folder
    ema = ema_from_settings(settings.ema, list(method.trainable_parameters()), acc.device)
    if ema is not None:
        if resumed_from:
            ema.load_from_folder(resumed_from)
        hooks.after_step.append(ema.after_step)
        checkpointer.companions.append(EmaSaver(ema, checkpointer.save_model))
        checkpointer.state_extras.append(ema)
        if settings.ema.sample_with_ema and hooks.sample is not None:
            hooks.sample = _with_ema(ema, hooks.sample)
    # 3. receipts beside every saved model
    counts = {"train_images": sum(len(d.images) for d in group.datasets),
              "validation_images": sum(len(d.images) for d in vgroup.datasets) if vgroup is not None else 0}
    receipt = build_receipt(settings.options, settings.script, dataset_fingerprint([group, vgroup]), counts)
    receipt["steps"] = {"max_train_steps": training.plan.max_train_steps, "epochs": training.plan.num_epochs}
    if ema is not None:
        receipt["ema"] = {"suffix": "-ema", "decay": settings.ema.decay, "power": settings.ema.power}
    checkpointer.companions.append(ReceiptWriter(receipt))
    return hooks


def build_validation_group(args: argparse.Namespace, script: str, models, group, acc, max_train_steps: int,
                           encode_latents: Optional[Callable] = None, encode_text: Optional[Callable] = None):
    """The held-out images of ``validation_split`` as a dataset group, or None when nothing is held out.

    With ``--cache_latents`` / ``--cache_text_encoder_outputs`` (and the encoder for it) the validation
    images are cached like the training ones: validation then needs neither the VAE nor the text encoders."""
    if getattr(args, "dataset_class", None):
        return None  # the user's class is the whole dataset: nothing is held out
    params = dataset_params_from_args(args, script)
    cache_te = bool(getattr(args, "cache_text_encoder_outputs", False)) and encode_text is not None
    vgroup = build_dataset_group(params, models.tokenizers, seed=args.seed, max_train_steps=max_train_steps,
                                 max_token_length=args.max_token_length, part="validation", te_cache_expected=cache_te,
                                 scan=scan_mode(bool(getattr(args, "verify_images", False))))
    if vgroup is None:
        return None
    vgroup.replacements = dict(group.replacements)  # Textual Inversion's caption replacement
    vgroup.latent_factor = group.latent_factor
    if getattr(args, "cache_latents", False) and encode_latents is not None:
        with torch.no_grad():
            cache_latents(vgroup, encode_latents, args.vae_batch_size, args.cache_latents_to_disk, acc.is_main_process)
        acc.wait_for_everyone()
    if cache_te:
        cache_text_encoder_outputs(vgroup, encode_text, args.cache_text_encoder_outputs_to_disk, acc.is_main_process)
        acc.wait_for_everyone()
    return vgroup


def _with_ema(ema: EMA, sample: Callable[[Optional[int], int], None]) -> Callable[[Optional[int], int], None]:
    """``--sample_with_ema``: the sample hook runs with the EMA weights swapped in."""
    def sample_with_ema(epoch: Optional[int], steps: int) -> None:
        with ema.applied():
            sample(epoch, steps)

    return sample_with_ema
