"""Native fine-tuning (fine_tune.py): U-Net in full, the text encoder only with ``--train_text_encoder``.

Loss letter "F": no masked loss and no per-sample loss weights (fine-tuning datasets have no
regularization images), no ``--v_pred_like_loss`` (spec losses §8).
"""
from __future__ import annotations

import argparse

import torch

from library.models.bundle import SDModels
from library.training.methods.full_model import FullModelMethod
from library.training.objective.diffusion_step import DiffusionObjective


class FineTuneMethod(FullModelMethod):
    """The fine_tune.py method: U-Net (+ text encoder with ``--train_text_encoder``) for the whole run."""

    @classmethod
    def from_args(cls, models: SDModels, args: argparse.Namespace, accelerator,
                  weight_dtype: torch.dtype) -> "FineTuneMethod":
        objective = DiffusionObjective.from_args(args, "F", models.vae.config.scaling_factor)
        return cls(models, objective, args, accelerator, weight_dtype, bool(args.train_text_encoder))
