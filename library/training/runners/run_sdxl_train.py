"""sdxl_train.py as a recipe of the shared runner (recipe.py): SDXL's U-Net (and text encoders) trained in full.

Differs from train_db / fine_tune by SDXL's two text encoders (each with its own rate and switch), ``--block_lr``,
the text-encoder output cache, and the optimizer step inside the backward pass (``--fused_backward_pass`` /
``--fused_optimizer_groups``, sd-scripts v0.9), which is what lets the 2.6 B-parameter U-Net train on one card.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Optional

from library.errors import UserError
from library.sampling.text_encoding import text_module
from library.training.methods.sdxl_full_model import SdxlFullModelMethod
from library.training.objective.diffusion_step import DiffusionObjective
from library.training.optim.block_lr import block_param_groups, parse_block_lr
from library.training.optim.fused_backward import (BackwardStepOptimizer, ChunkStepper, SchedulerSet,
                                                   attach_fused_adafactor, first_chunk_of_groups, split_into_chunks)
from library.training.optim.optimizers import resolve_optimizer_type
from library.training.runners.recipe import Recipe, RecipeRun, Training, run_recipe
from library.training.runners.run_common import cache_sdxl_text_outputs_if_asked, optimizer_and_schedule
from library.training.runners.run_full_model import whole_model_checkpointer
from library.training.runners.run_network import verify_sdxl_base
from library.training.runners.sharded import check_sharded_options, launched_sharding, prepare_bundle, sharding

logger = logging.getLogger(__name__)


class SdxlTrainRecipe(Recipe):
    """sdxl_train.py: the U-Net while --learning_rate > 0; with --train_text_encoder, TE1 / TE2 while their
    rates are > 0 (sd-scripts v0.8.7)."""

    script = "sdxl_train"
    tracker = "finetuning"  # sd-scripts' sdxl_train.py default --log_tracker_name
    sdxl = True
    announce_drawn_seed = True

    def __init__(self) -> None:
        self.block_lrs: Optional[list[float]] = None
        self.train_unet = True
        self.te_lrs: tuple[float, float] = (0.0, 0.0)

    def check_options(self, args: argparse.Namespace) -> None:
        check_sdxl_train_options(args)
        check_fused_options(args)
        check_sharded_options(args)
        self.block_lrs = parse_block_lr(args.block_lr)
        self.train_unet = args.learning_rate > 0
        if args.train_text_encoder:
            self.te_lrs = tuple(lr if lr is not None else args.learning_rate  # type: ignore[assignment]
                                for lr in (args.learning_rate_te1, args.learning_rate_te2))
        elif args.learning_rate_te1 is not None or args.learning_rate_te2 is not None:
            logger.warning("--learning_rate_te1 / --learning_rate_te2 are ignored without --train_text_encoder")
        if not self.train_unet and not any(lr > 0 for lr in self.te_lrs):
            raise UserError("nothing to train: --learning_rate is 0 (U-Net frozen) and no text encoder trains "
                            "(--train_text_encoder with a rate > 0)")

    @property
    def train_te(self) -> tuple[bool, bool]:
        return self.te_lrs[0] > 0, self.te_lrs[1] > 0

    def trains(self, args: argparse.Namespace) -> tuple[bool, bool]:
        return self.train_unet, any(self.train_te)

    def after_load(self, run: RecipeRun) -> None:
        models, acc = run.models, run.acc
        for te, trains in zip(models.text_encoders, self.train_te):
            if not trains:  # loaded as trainable when the other encoder trains: freeze and cast this one
                te.requires_grad_(False)
                te.to(acc.device, run.wdtype)
        if self.train_te[0]:
            # TE1's output is its penultimate layer: the last layer and final norm get no gradient (sd-scripts)
            text_model = text_module(models.text_encoders[0])
            text_model.encoder.layers[-1].requires_grad_(False)
            text_model.final_layer_norm.requires_grad_(False)
        if run.args.diffusers_xformers:
            logger.info("using xformers through diffusers (U-Net and VAE)")
            models.unet.enable_xformers_memory_efficient_attention()
            models.vae.enable_xformers_memory_efficient_attention()

    def text_encoder_cache(self, run: RecipeRun) -> Optional[Callable]:
        return cache_sdxl_text_outputs_if_asked(run.args, run.group, run.models, run.acc, run.wdtype)

    def prepare(self, run: RecipeRun) -> Training:
        args, acc, models = run.args, run.acc, run.models
        trained = ([models.unet] if self.train_unet else []) + \
            [te for te, t in zip(models.text_encoders, self.train_te) if t]
        if args.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            for te, trains in zip(models.text_encoders, self.train_te):
                if trains:
                    te.gradient_checkpointing_enable()
        if args.full_fp16 or args.full_bf16:
            for m in trained:
                m.to(run.wdtype)
        groups, lr_names = self._param_groups(run)
        objective = DiffusionObjective.from_settings(run.settings.objective, models.vae.config.scaling_factor)
        method = SdxlFullModelMethod(models, objective, run.settings.text, acc, run.wdtype, self.train_unet,
                                     self.train_te, lr_names)
        weights = None
        if sharding(acc):  # FSDP / DeepSpeed: the trained models as one prepared bundle (no fused step here)
            optimizer, lr_sched, plan, _ = optimizer_and_schedule(args, run.settings.loop, groups, run.group, acc)
            names = (["unet"] if self.train_unet else []) + [f"te{i + 1}" for i, t in enumerate(self.train_te) if t]
            parts, bundle, optimizer, lr_sched, weights = prepare_bundle(acc, dict(zip(names, trained)), optimizer,
                                                                         lr_sched)
            method.attach(parts.get("unet", models.unet),
                          [parts.get(f"te{i + 1}", te) for i, te in enumerate(models.text_encoders)], bundle=bundle)
        else:
            optimizer, lr_sched, plan = _optimizers(args, run, groups)
            prepared = [acc.prepare(m) for m in trained]
            unet = prepared.pop(0) if self.train_unet else models.unet
            method.attach(unet, [prepared.pop(0) if t else te for te, t in zip(models.text_encoders, self.train_te)])
        checkpointer = whole_model_checkpointer(args, run.settings, acc, models, plan, run.group, weights)
        return Training(method, optimizer, lr_sched, plan, checkpointer)

    def _param_groups(self, run: RecipeRun) -> tuple[list[dict], list[str]]:
        """sd-scripts' groups: the U-Net at --learning_rate (or one group per --block_lr block), then TE1 and TE2
        at their rates; with their learning-rate log names."""
        models, lr = run.models, run.args.learning_rate
        groups: list[dict] = []
        names: list[str] = []
        if self.train_unet:
            if self.block_lrs is None:
                groups.append({"params": list(models.unet.parameters()), "lr": lr})
                names.append("lr/unet")
            else:
                block_groups, block_names = block_param_groups(models.unet, self.block_lrs)
                groups += block_groups
                names += block_names
        for i, (te, te_lr) in enumerate(zip(models.text_encoders, self.te_lrs)):
            if te_lr > 0:
                groups.append({"params": list(te.parameters()), "lr": te_lr})
                names.append(f"lr/text_encoder{i + 1}")
        return groups, names

    def note(self) -> str:
        te = [f"text encoder {i + 1}" for i, t in enumerate(self.train_te) if t]
        return ", U-Net " + ("trained" if self.train_unet else "frozen") + (", " + " and ".join(te) if te else "")


def run(args: argparse.Namespace) -> Optional[str]:
    """Train SDXL in full; returns the path of the final model (None after ``--dry_run``)."""
    return run_recipe(args, SdxlTrainRecipe())


def _optimizers(args: argparse.Namespace, run: RecipeRun, groups: list[dict]):
    """The optimizer and schedule the loop steps, prepared by the accelerator: one of each, or with the fused
    options the hooks that step inside backward and the facades the loop sees. Returns (optimizer, sched, plan)."""
    acc, clip = run.acc, args.max_grad_norm
    if not args.fused_optimizer_groups:
        optimizer, lr_sched, plan, _ = optimizer_and_schedule(args, run.settings.loop, groups, run.group, acc)
        optimizer, lr_sched = acc.prepare(optimizer, lr_sched)
        if args.fused_backward_pass:
            optimizer = attach_fused_adafactor(optimizer, clip)
        return optimizer, lr_sched, plan
    chunks = split_into_chunks(groups, args.fused_optimizer_groups)
    optimizers, schedulers = [], []
    for chunk in chunks:  # each chunk its own optimizer and schedule, prepared in order (resume restores them)
        opt, sched, plan, _ = optimizer_and_schedule(args, run.settings.loop, [{"params": chunk.params,
                                                                                 "lr": chunk.lr}], run.group, acc)
        opt, sched = acc.prepare(opt, sched)
        optimizers.append(opt)
        schedulers.append(sched)
    logger.info("--fused_optimizer_groups %d: %d optimizers", args.fused_optimizer_groups, len(optimizers))
    stepper = ChunkStepper(optimizers, clip)
    return (BackwardStepOptimizer(optimizers, stepper.finish), SchedulerSet(schedulers,
                                                                             first_chunk_of_groups(chunks, groups)),
            plan)


def check_sdxl_train_options(args: argparse.Namespace) -> None:
    """sd-scripts' verify_sdxl_training_args and sdxl_train.py's own assertions, as one line each."""
    verify_sdxl_base(args)
    if args.train_text_encoder and args.cache_text_encoder_outputs:
        raise UserError("--cache_text_encoder_outputs cannot be used with --train_text_encoder: the outputs of a "
                        "text encoder in training change every step")


def check_fused_options(args: argparse.Namespace) -> None:
    """The fused optimizer step: what it needs, refused up front with one line (before any model loads)."""
    fused = "--fused_backward_pass" if args.fused_backward_pass else (
        "--fused_optimizer_groups" if args.fused_optimizer_groups else None)
    if fused is None:
        return
    if args.fused_backward_pass and args.fused_optimizer_groups:
        raise UserError("--fused_backward_pass and --fused_optimizer_groups exclude each other")
    optimizer = resolve_optimizer_type(args.optimizer_type, args.use_8bit_adam, args.use_lion_optimizer)
    if args.fused_backward_pass and optimizer.lower() != "adafactor":
        raise UserError(f"--fused_backward_pass works with --optimizer_type AdaFactor only (not {optimizer})")
    problems = [
        (args.gradient_accumulation_steps > 1, "--gradient_accumulation_steps > 1: the step happens in every "
                                               "backward pass"),
        (args.mixed_precision == "fp16", "--mixed_precision fp16: the loss scaler needs every gradient before "
                                         "a step (use bf16)"),
        (bool(args.deepspeed), "--deepspeed: DeepSpeed owns the optimizer step"),
        (int(os.environ.get("WORLD_SIZE", "1")) > 1, "more than one process: gradients are not yet averaged "
                                                     "when the hooks step"),
        (bool(args.check_grads), "--check_grads: the gradients are freed inside the backward pass"),
        (launched_sharding(args) == "fsdp", "FSDP: the gradients are sharded and reduced after the backward pass"),
    ]
    for bad, why in problems:
        if bad:
            raise UserError(f"{fused} cannot be used with {why}")
