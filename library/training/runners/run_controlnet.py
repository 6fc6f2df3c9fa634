"""train_controlnet.py as a recipe of the shared runner (recipe.py): a ControlNet trained on a frozen SD1/SD2 model.

The ControlNet starts as diffusers' ``ControlNetModel.from_unet`` copy of the loaded U-Net (upstream's way), or
from ``--controlnet_model_name_or_path`` (an LDM ControlNet file with or without ``control_model.``, a
Diffusers-keyed file or a Diffusers folder). Upstream's train_controlnet.py parses several shared options and
then ignores them (``--min_timestep``/``--max_timestep``, ``--ip_noise_gamma``, ``--zero_terminal_snr``, the loss
weightings other than min-SNR, ``--full_bf16``, ``--weighted_captions``); here the shared objective applies them
as in the other trainers, and what cannot work is rejected before any model loads.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

import torch

from library.errors import UserError
from library.models.small_map_conv import use_matrix_convs
from library.sampling.controlnet import ControlNetOption, LoadedControlNet, load_control_net
from library.training.loop.checkpointing import Checkpointer
from library.training.methods.controlnet import ControlNetMethod
from library.training.methods.controlnet_saving import ControlNetSaver, save_extension
from library.training.objective.diffusion_step import DiffusionObjective
from library.training.runners import accelerate_setup as setup
from library.training.runners.recipe import Recipe, RecipeRun, Training, run_recipe
from library.training.runners.run_common import make_sample_hook, optimizer_and_schedule

logger = logging.getLogger(__name__)

OPTION = "--controlnet_model_name_or_path"


def check_controlnet_dataset_options(args: argparse.Namespace) -> None:
    """Options the ControlNet trainers parse (shared dataset group) but have no use for: one clear line each."""
    if getattr(args, "in_json", None) is not None:
        raise UserError("--in_json is not used by the ControlNet trainers: give --train_data_dir and "
                        "--conditioning_data_dir, or --dataset_config with conditioning_data_dir in each subset")
    if getattr(args, "dataset_repeats", 1) != 1:
        raise UserError("--dataset_repeats is for fine-tuning datasets (--in_json); ControlNet subsets repeat by "
                        "num_repeats in --dataset_config")
    if getattr(args, "alpha_mask", False):
        raise UserError("--alpha_mask needs --masked_loss, which the ControlNet trainers do not have")


class ControlNetRecipe(Recipe):
    """train_controlnet.py: the ControlNet trains in full; U-Net, VAE and text encoder are frozen."""

    script = "train_controlnet"
    tracker = "controlnet_train"
    announce_drawn_seed = True

    def __init__(self) -> None:
        self.controlnet: Optional[torch.nn.Module] = None

    def check_options(self, args: argparse.Namespace) -> None:
        check_controlnet_dataset_options(args)
        if args.fp8_base:
            raise UserError("--fp8_base is not supported by train_controlnet.py: the ControlNet starts as a copy of "
                            "the U-Net, which fp8 storage would round")
        if args.full_bf16 and args.mixed_precision != "bf16":
            raise UserError("--full_bf16 needs --mixed_precision bf16")
        path = args.controlnet_model_name_or_path
        if path is not None and not os.path.exists(path):
            raise UserError(f"{OPTION} {path}: no such file or folder")

    def trains(self, args: argparse.Namespace) -> tuple[bool, bool]:
        # the U-Net stays float32 until the ControlNet is copied from it (after_load freezes and casts it)
        return True, False

    def after_load(self, run: RecipeRun) -> None:
        args, models, acc = run.args, run.models, run.acc
        unet = models.unet
        path = args.controlnet_model_name_or_path
        if path:
            controlnet = load_control_net(path, unet, "cpu", torch.float32, option=OPTION)
            logger.info("continuing ControlNet %s", path)
        else:
            from diffusers import ControlNetModel  # start-up (diffusers: ~2 s)

            controlnet = ControlNetModel.from_unet(unet)
        unet.requires_grad_(False)
        unet.to(acc.device, run.wdtype)
        self.controlnet = controlnet.to(acc.device).train().requires_grad_(True)
        use_matrix_convs(self.controlnet)  # as the U-Net's (small_map_conv.py); its weights' gradients too

    def prepare(self, run: RecipeRun) -> Training:
        args, acc, models, settings = run.args, run.acc, run.models, run.settings
        controlnet = self.controlnet
        if args.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        if args.full_fp16 or args.full_bf16:
            controlnet.to(run.wdtype)
        params = list(controlnet.parameters())
        optimizer, lr_sched, plan, _ = optimizer_and_schedule(args, settings.loop, params, run.group, acc)
        prepared, optimizer, lr_sched = acc.prepare(controlnet, optimizer, lr_sched)
        objective = DiffusionObjective.from_settings(settings.objective, models.vae.config.scaling_factor)
        method = ControlNetMethod(models, prepared, objective, settings.text, acc, run.wdtype)
        saver = ControlNetSaver(lambda: acc.unwrap_model(prepared), args.save_model_as, setup.save_dtype(args))
        checkpointer = Checkpointer(settings.saving, acc, saver, save_extension(args.save_model_as), plan.num_epochs,
                                    plan.max_train_steps, settings.hub)
        return Training(method, optimizer, lr_sched, plan, checkpointer)

    def sample_hook(self, run: RecipeRun):
        """Sample images guided by each prompt's ``--cn`` image through the ControlNet being trained."""
        nets = [LoadedControlNet(self.controlnet, ControlNetOption("(training)"))]
        return make_sample_hook(run.args, run.models, run.acc, run.wdtype, control_nets=nets)


def run(args: argparse.Namespace) -> Optional[str]:
    """Train a ControlNet; returns the path of the final file or folder (None after ``--dry_run``)."""
    return run_recipe(args, ControlNetRecipe())
