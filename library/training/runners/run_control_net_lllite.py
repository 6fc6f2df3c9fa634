"""sdxl_train_control_net_lllite.py as a recipe of the shared runner (recipe.py): a ControlNet-LLLite on a frozen
SDXL model.

Upstream keeps the LLLite weights in the training dtype under mixed precision and samples no images; here the
network trains in float32 unless ``--full_fp16`` / ``--full_bf16`` (as the network trainers), and
``--sample_prompts`` samples through it with each prompt's ``--cn`` image. ``--cond_emb_dim`` and ``--network_dim``
(None by default upstream, which then fails inside the model code) are required, or taken from
``--network_weights``.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Optional

from library.errors import UserError
from library.formats.modelspec import modelspec_from_options, trained_resolution
from library.models.checkpoint_io import CheckpointReader
from library.training.loop.checkpointing import Checkpointer
from library.training.methods.control_net_lllite import ARCHITECTURE, LLLiteMethod
from library.training.methods.lllite_network import LLLiteNetwork, dims_of, load_lllite_weights
from library.training.objective.diffusion_step import DiffusionObjective
from library.training.runners import accelerate_setup as setup
from library.training.runners.recipe import Recipe, RecipeRun, Training, run_recipe
from library.training.runners.run_common import (cache_sdxl_text_outputs_if_asked, make_sample_hook,
                                                 optimizer_and_schedule)
from library.training.runners.run_controlnet import check_controlnet_dataset_options
from library.training.runners.run_network import verify_sdxl_base

logger = logging.getLogger(__name__)


class LLLiteRecipe(Recipe):
    """sdxl_train_control_net_lllite.py: the LLLite modules train; U-Net, VAE and both text encoders are frozen."""

    script = "sdxl_train_control_net_lllite"
    tracker = "lllite_control_net_train"
    sdxl = True
    announce_drawn_seed = True

    def __init__(self) -> None:
        self.network: Optional[LLLiteNetwork] = None
        self.weights: Optional[dict] = None

    def check_options(self, args: argparse.Namespace) -> None:
        verify_sdxl_base(args)
        check_controlnet_dataset_options(args)
        if args.full_bf16 and args.mixed_precision != "bf16":
            raise UserError("--full_bf16 needs --mixed_precision bf16")
        if args.network_weights:
            if not os.path.isfile(args.network_weights):
                raise UserError(f"--network_weights {args.network_weights}: no such file")
            return
        missing = [f"--{k}" for k in ("cond_emb_dim", "network_dim") if getattr(args, k) is None]
        if missing:
            raise UserError(f"{' and '.join(missing)} required: the LLLite's sizes (typical: --cond_emb_dim 32 "
                            "--network_dim 64), or --network_weights to continue a saved LLLite")
        if args.cond_emb_dim % 2:
            raise UserError(f"--cond_emb_dim must be even (the first hint convs have half of it), got "
                            f"{args.cond_emb_dim}")

    def text_encoder_cache(self, run: RecipeRun) -> Optional[Callable]:
        return cache_sdxl_text_outputs_if_asked(run.args, run.group, run.models, run.acc, run.wdtype)

    def after_load(self, run: RecipeRun) -> None:
        args = run.args
        cond_emb_dim, dim = args.cond_emb_dim, args.network_dim
        if args.network_weights:
            self.weights = dict(CheckpointReader(args.network_weights).items())
            try:
                file_dims = dims_of(self.weights)
            except ValueError as e:
                raise UserError(f"--network_weights {args.network_weights}: not a ControlNet-LLLite file ({e})") \
                    from None
            cond_emb_dim, dim = cond_emb_dim or file_dims[0], dim or file_dims[1]
        self.network = LLLiteNetwork(run.models.unet, cond_emb_dim, dim, dropout=args.network_dropout)
        if self.weights is not None:
            load_lllite_weights(self.network, self.weights, args.network_weights)
            logger.info("continuing ControlNet-LLLite %s", args.network_weights)
        self.network.to(run.acc.device)
        if args.gradient_checkpointing:
            run.models.unet.enable_gradient_checkpointing()
            run.models.unet.train()  # diffusers only checkpoints in training mode

    def prepare(self, run: RecipeRun) -> Training:
        args, acc, models, settings = run.args, run.acc, run.models, run.settings
        network = self.network
        if args.full_fp16 or args.full_bf16:
            network.to(run.wdtype)
        optimizer, lr_sched, plan, _ = optimizer_and_schedule(args, settings.loop, list(network.parameters()),
                                                              run.group, acc)
        prepared, optimizer, lr_sched = acc.prepare(network, optimizer, lr_sched)
        objective = DiffusionObjective.from_settings(settings.objective, models.vae.config.scaling_factor)
        method = LLLiteMethod(models, network, objective, settings.text, acc, run.wdtype)
        method.module = prepared
        method.save_dtype = setup.save_dtype(args)

        def metadata() -> dict:
            spec = modelspec_from_options(settings.options, "sdxl", "lora", resolution=trained_resolution(run.group))
            return {**spec, "modelspec.architecture": ARCHITECTURE}

        method.save_metadata = metadata
        ext = "." + (args.save_model_as or "safetensors")
        checkpointer = Checkpointer(settings.saving, acc, method.save, ext, plan.num_epochs, plan.max_train_steps,
                                    settings.hub)
        return Training(method, optimizer, lr_sched, plan, checkpointer)

    def sample_hook(self, run: RecipeRun):
        """Sample images guided by each prompt's ``--cn`` image through the LLLite being trained."""
        return make_sample_hook(run.args, run.models, run.acc, run.wdtype, lllites=[self.network])


def run(args: argparse.Namespace) -> Optional[str]:
    """Train a ControlNet-LLLite; returns the path of the final file (None after ``--dry_run``)."""
    return run_recipe(args, LLLiteRecipe())
