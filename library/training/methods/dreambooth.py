"""DreamBooth (train_db.py): U-Net and text encoder trained in full, with regularization images.

Prior preservation needs nothing here: the dataset gives regularization samples the weight
``--prior_loss_weight`` in ``loss_weights``, and loss letter "D" applies it (spec losses §8.2) while
dropping ``--v_pred_like_loss`` as train_db does (spec losses §8, cli-options pitfall 5).
"""
from __future__ import annotations

from typing import Optional

import torch

from library.models.bundle import SDModels
from library.training.methods.full_model import FullModelMethod
from library.training.objective.diffusion_step import DiffusionObjective
from library.training.settings import TrainSettings


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
    def from_settings(cls, models: SDModels, settings: TrainSettings, accelerator,
                      weight_dtype: torch.dtype) -> "DreamBoothMethod":
        objective = DiffusionObjective.from_settings(settings.objective, models.vae.config.scaling_factor)
        m = settings.method
        train_te, stop = text_encoder_schedule(m.stop_text_encoder_training)
        return cls(models, objective, settings.text, accelerator, weight_dtype, train_te, stop,
                   pad_per_batch=m.no_token_padding, gradient_checkpointing=m.gradient_checkpointing)
