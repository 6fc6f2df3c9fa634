"""SDXL trained in full (sdxl_train.py): the U-Net, and with ``--train_text_encoder`` either or both text encoders.

What trains: the U-Net while ``--learning_rate`` > 0, text encoder 1 / 2 while their rates (``--learning_rate_te1``
/ ``_te2``, default ``--learning_rate``) are > 0 (sd-scripts v0.8.7). How a batch becomes a loss: the shared
diffusion objective with SDXL conditioning (both encoders' hidden states, TE2's pooled output, the size and
crop ids), or the cached encoder outputs when the batch carries them. The modules are the ones accelerate
prepared, called through their wrappers, so DDP syncs their gradients itself.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from library.models.bundle import SDModels
from library.training.loop.checkpointing import TrainState
from library.training.objective.conditioning import TextConditioning, text_conditioning
from library.training.objective.diffusion_step import DiffusionObjective, StepRandom, unet_batch_loss
from library.training.settings import TextSettings


class SdxlFullModelMethod:
    """Trains ``models.unet`` and the text encoders flagged in ``train_text_encoders`` (TE1, TE2)."""

    loss_log_keys = ("loss", None)  # sdxl_train.py logs `loss` per step and `loss/epoch`, like fine_tune.py

    def __init__(self, models: SDModels, objective: DiffusionObjective, text: TextSettings, accelerator,
                 weight_dtype: torch.dtype, train_unet: bool, train_text_encoders: tuple[bool, bool],
                 lr_names: list[str]):
        self.models, self.obj, self.text, self.acc = models, objective, text, accelerator
        self.weight_dtype = weight_dtype
        self.train_unet = train_unet
        self.train_te = train_text_encoders
        self.lr_names = lr_names  # one per optimizer param group: lr/unet or lr/block<i>, lr/text_encoder1/2
        self.unet: torch.nn.Module = models.unet
        self.text_encoders: list[torch.nn.Module] = list(models.text_encoders)
        self.modules: tuple = ()
        self.module: Optional[torch.nn.Module] = None

    def attach(self, unet: torch.nn.Module, text_encoders: list[torch.nn.Module],
               bundle: Optional[torch.nn.Module] = None) -> None:
        """Use the prepared (possibly DDP-wrapped) modules for forward passes and accumulation. Sharded training
        (FSDP / DeepSpeed): the trained models call through the prepared ``bundle``, the one module to sync."""
        self.unet, self.text_encoders = unet, list(text_encoders)
        trained = ([unet] if self.train_unet else []) + [te for te, t in zip(text_encoders, self.train_te) if t]
        self.modules = (bundle,) if bundle is not None else tuple(trained)
        self.module = self.modules[0]

    # --- loss ---------------------------------------------------------------------------------
    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor:
        with torch.set_grad_enabled(any(self.train_te) and torch.is_grad_enabled()), self.acc.autocast():
            cond = self._conditioning(batch)
        return unet_batch_loss(self.unet, self.models.vae, cond, batch, self.obj, rand, self.acc, self.weight_dtype)

    def _conditioning(self, batch: dict) -> TextConditioning:
        # SDXL ignores --clip_skip (fixed layers; warned when given), as sd-scripts does
        return text_conditioning("sdxl", self.text_encoders, batch, clip_skip=None,
                                 max_token_length=self.text.max_token_length, device=self.acc.device,
                                 dtype=self.weight_dtype)

    # --- loop hooks ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        parts = ([self.models.unet] if self.train_unet else []) + \
            [te for te, t in zip(self.models.text_encoders, self.train_te) if t]
        return [p for m in parts for p in m.parameters() if p.requires_grad]

    def lr_log_names(self, n_groups: int) -> list[str]:
        return list(self.lr_names[:n_groups])

    def on_epoch_start(self, epoch: int) -> None:
        for m in self.modules:
            m.train()

    def after_optimizer_step(self, state: TrainState) -> dict:
        return {}
