"""U-Net (+ text encoder) trained in full: the method object shared by train_db.py and fine_tune.py.

What trains: every U-Net parameter, and the text encoder's while ``te_stop_step`` is not reached
(spec cli-options §12 D/F). How a batch becomes a loss: the shared diffusion objective with the method's
loss letter (D: prior weights and masks, no v_pred_like_loss; F: neither, spec losses §8). Both modules
are the ones accelerate prepared, called through their wrappers, so DDP syncs their gradients itself.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch

from library.models.bundle import SDModels
from library.training.loop.checkpointing import TrainState
from library.training.objective.conditioning import (TextConditioning, encode_sd, text_conditioning,
                                                     weighted_captions_tokenizer)
from library.training.objective.diffusion_step import DiffusionObjective, StepRandom, unet_batch_loss
from library.training.settings import TextSettings

logger = logging.getLogger(__name__)

LR_NAMES = ("lr/unet", "lr/text_encoder1", "lr/text_encoder2")  # spec cli-options §13, D/F


class FullModelMethod:
    """Trains ``models.unet`` and (optionally, until a step) ``models.text_encoders[0]``."""

    loss_log_keys = ("loss", None)  # D/F log only `loss` per step (spec cli-options §13)

    def __init__(self, models: SDModels, objective: DiffusionObjective, text: TextSettings, accelerator,
                 weight_dtype: torch.dtype, train_text_encoder: bool, te_stop_step: Optional[int] = None,
                 pad_per_batch: bool = False, gradient_checkpointing: bool = False):
        self.models, self.obj, self.text, self.acc = models, objective, text, accelerator
        self.gradient_checkpointing = gradient_checkpointing
        self.weight_dtype = weight_dtype
        self.te_training = train_text_encoder
        self.te_stop_step = te_stop_step
        self.pad_per_batch = pad_per_batch  # train_db --no_token_padding
        # --weighted_captions (SD1/SD2)
        self.weighted_tokenizer = weighted_captions_tokenizer(models, text.weighted_captions)
        self.unet: torch.nn.Module = models.unet
        self.text_encoder: torch.nn.Module = models.text_encoders[0]
        self.module: torch.nn.Module = self.unet
        self.modules: tuple = (self.unet,)
        self.bundle: Optional[torch.nn.Module] = None  # sharded training: the prepared bundle of trained models

    def attach(self, unet: torch.nn.Module, text_encoder: Optional[torch.nn.Module],
               bundle: Optional[torch.nn.Module] = None) -> None:
        """Use the prepared (possibly DDP-wrapped) modules for forward passes and accumulation. Sharded training
        (FSDP / DeepSpeed): ``unet`` / ``text_encoder`` call through the prepared ``bundle``, which is then the
        one module accumulation syncs."""
        self.unet = self.module = unet
        if text_encoder is not None:
            self.text_encoder = text_encoder
        self.bundle = bundle
        if bundle is not None:
            self.module, self.modules = bundle, (bundle,)
            return
        self.modules = (unet, text_encoder) if text_encoder is not None and self.te_training else (unet,)

    # --- loss ---------------------------------------------------------------------------------
    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor:
        with torch.set_grad_enabled(self.te_training and torch.is_grad_enabled()), self.acc.autocast():
            cond = self._conditioning(batch)
        return unet_batch_loss(self.unet, self.models.vae, cond, batch, self.obj, rand, self.acc, self.weight_dtype)

    def _conditioning(self, batch: dict) -> TextConditioning:
        t = self.text
        weighted = self.weighted_tokenizer
        if self.pad_per_batch and weighted is None:
            return TextConditioning(encode_sd(self.text_encoder, self._ids_padded_to_longest(batch["captions"]),
                                              t.clip_skip, None).to(self.weight_dtype))
        return text_conditioning(self.models.family, [self.text_encoder], batch, clip_skip=t.clip_skip,
                                 max_token_length=t.max_token_length, device=self.acc.device, dtype=self.weight_dtype,
                                 weighted_tokenizer=weighted)

    def _ids_padded_to_longest(self, captions: list[str]) -> torch.Tensor:
        """--no_token_padding as sd-scripts intended: pad to the longest caption of the batch (<= 77 tokens).

        (B, 1, L) so that the encoder sees one chunk per caption, spec losses §9.
        """
        tok = self.models.tokenizers[0]
        ids = tok(captions, padding="longest", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        return ids[:, None, :].to(self.acc.device)

    # --- loop hooks ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        params = [p for p in self.models.unet.parameters() if p.requires_grad]
        if self.te_training:
            params += [p for p in self.models.text_encoders[0].parameters() if p.requires_grad]
        return params

    def lr_log_names(self, n_groups: int) -> list[str]:
        return list(LR_NAMES[:n_groups])

    def on_epoch_start(self, epoch: int) -> None:
        self.models.unet.train()
        # diffusers / transformers checkpoint only in training mode, so a frozen TE trains too then (sd-scripts)
        if self.te_training or self.gradient_checkpointing:
            self.models.text_encoders[0].train()

    def after_optimizer_step(self, state: TrainState) -> dict:
        return self.sync_step(state.global_step)

    def sync_step(self, global_step: int) -> dict:
        """Stop text-encoder training once ``global_step`` reaches ``--stop_text_encoder_training`` (D).

        Also called right after ``--resume``, so a resumed run freezes the text encoder at the same step.
        """
        if not self.te_training or self.te_stop_step is None or global_step < self.te_stop_step:
            return {}
        logger.info("stop text encoder training at step %d", global_step)
        te = self.models.text_encoders[0]
        te.requires_grad_(False)
        if not self.gradient_checkpointing:
            te.eval()
        self.te_training = False
        self.modules = (self.bundle if self.bundle is not None else self.unet,)
        return {}
