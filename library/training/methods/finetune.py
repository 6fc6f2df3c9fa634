"""Native fine-tuning (fine_tune.py): U-Net in full, the text encoder only with ``--train_text_encoder``.

Loss letter "F": no masked loss and no per-sample loss weights (fine-tuning datasets have no
regularization images), no ``--v_pred_like_loss`` (spec losses §8).
"""
from __future__ import annotations

import torch

from library.models.bundle import SDModels
from library.training.methods.full_model import FullModelMethod
from library.training.objective.diffusion_step import DiffusionObjective
from library.training.settings import TrainSettings


class FineTuneMethod(FullModelMethod):
    """The fine_tune.py method: U-Net (+ text encoder with ``--train_text_encoder``) for the whole run."""

    @classmethod
    def from_settings(cls, models: SDModels, settings: TrainSettings, accelerator,
                      weight_dtype: torch.dtype) -> "FineTuneMethod":
        objective = DiffusionObjective.from_settings(settings.objective, models.vae.config.scaling_factor)
        m = settings.method
        return cls(models, objective, settings.text, accelerator, weight_dtype, m.train_text_encoder,
                   gradient_checkpointing=m.gradient_checkpointing)
