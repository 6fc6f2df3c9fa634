"""DreamBooth (train_db.py): U-Net and text encoder trained in full, with regularization images.

Prior preservation needs nothing here: the dataset gives regularization samples the weight
``--prior_loss_weight`` in ``loss_weights``, and loss letter "D" applies it (spec losses §8.2) while
dropping ``--v_pred_like_loss`` as train_db does (spec losses §8, cli-options pitfall 5).
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from library.models.bundle import SDModels
from library.training.methods.full_model import FullModelMethod
from library.training.objective.diffusion_step import DiffusionObjective


def text_encoder_schedule(stop_text_encoder_training: Optional[int]) -> tuple[bool, Optional[int]]:
    """``(train the TE at all, step at which it stops)`` from ``--stop_text_encoder_training`` (spec §12 D).

    None: the whole run; a negative value (-1): never; N >= 0: until global step N (0 = prepared, never stepped).
    """
    if stop_text_encoder_training is None:
        return True, None
    if stop_text_encoder_training < 0:
        return False, None
    return True, stop_text_encoder_training


class DreamBoothMethod(FullModelMethod):
    """The train_db.py method: U-Net + text encoder until ``--stop_text_encoder_training``."""

    @classmethod
    def from_args(cls, models: SDModels, args: argparse.Namespace, accelerator,
                  weight_dtype: torch.dtype) -> "DreamBoothMethod":
        objective = DiffusionObjective.from_args(args, "D", models.vae.config.scaling_factor)
        train_te, stop = text_encoder_schedule(args.stop_text_encoder_training)
        return cls(models, objective, args, accelerator, weight_dtype, train_te, stop,
                   pad_per_batch=bool(args.no_token_padding))
