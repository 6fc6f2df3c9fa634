"""train_db.py: DreamBooth checks, then the shared whole-model run (spec cli-options §12 D)."""
from __future__ import annotations

import argparse
import logging

from library.errors import UserError
from library.training.methods.dreambooth import DreamBoothMethod, text_encoder_schedule
from library.training.runners.run_full_model import FullModelRecipe
from library.training.runners.run_full_model import run as run_full_model

logger = logging.getLogger(__name__)

def _check(args: argparse.Namespace) -> None:
    if args.no_token_padding and args.max_token_length is not None:
        # per-batch padding gives one chunk of <= 77 tokens: there is nothing to extend to 150 / 225
        raise UserError("--no_token_padding cannot be combined with --max_token_length")
    if args.no_token_padding and getattr(args, "weighted_captions", False):
        logger.warning("--no_token_padding has no effect with --weighted_captions: weighted captions are padded "
                       "with EOS to 77 tokens per chunk (as in sd-scripts)")


def run(args: argparse.Namespace) -> str:
    """Train U-Net (+ text encoder) with DreamBooth folders and regularization images; returns the final path."""
    recipe = FullModelRecipe("train_db", "dreambooth", DreamBoothMethod.from_settings,
                             train_text_encoder=lambda a: text_encoder_schedule(a.stop_text_encoder_training)[0],
                             check=_check)
    return run_full_model(args, recipe)
