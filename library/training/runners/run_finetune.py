"""fine_tune.py: fine-tuning checks, then the shared whole-model run (spec cli-options §12 F)."""
from __future__ import annotations

import argparse
import logging

from library.errors import UserError
from library.models.bundle import SDModels
from library.training.methods.finetune import FineTuneMethod
from library.training.runners.run_full_model import FullModelRecipe
from library.training.runners.run_full_model import run as run_full_model

logger = logging.getLogger(__name__)


def _diffusers_xformers(models: SDModels, args: argparse.Namespace) -> None:
    """--diffusers_xformers: diffusers' own xformers switch on the U-Net (instead of --xformers/--sdpa)."""
    if not args.diffusers_xformers:
        return
    logger.info("using xformers through diffusers")
    models.unet.enable_xformers_memory_efficient_attention()


def _check(args: argparse.Namespace) -> None:
    if args.diffusers_xformers:
        try:  # checked before loading anything: the switch needs the package (GPU only)
            import xformers  # optional package noqa: F401
        except ImportError:
            raise UserError("--diffusers_xformers needs the xformers package (GPU only): pip install xformers") from None
    if args.learning_rate_te is not None and not args.train_text_encoder:
        logger.warning("--learning_rate_te is ignored without --train_text_encoder")


def run(args: argparse.Namespace) -> str:
    """Fine-tune U-Net (+ text encoder with --train_text_encoder) from metadata JSON; returns the final path."""
    recipe = FullModelRecipe("fine_tune", "finetuning", FineTuneMethod.from_settings,
                             train_text_encoder=lambda a: bool(a.train_text_encoder), check=_check,
                             after_load=_diffusers_xformers)
    return run_full_model(args, recipe)
