"""Textual Inversion (train_textual_inversion.py): only the new tokens' embedding rows learn.

What trains: the whole input-embedding weight goes to the optimizer (as upstream, so optimizer
state and LR groups look the same), and after every optimizer step the rows of the old vocabulary are
copied back from a frozen copy (spec losses §10, cli-options §12 T). Everything else in the text
encoder and the U-Net is frozen. Loss letter "T": prior weights, masks and v_pred_like_loss (spec losses §8).
Saved: the new rows as ``{"emb_params": T[n, d]}`` (spec file-formats §c).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch

from library.formats.ti_embedding import embedding_state_dict, save_embedding_file
from library.models.bundle import SDModels
from library.training.loop.checkpointing import TrainState
from library.training.objective.conditioning import text_conditioning
from library.training.objective.diffusion_step import (DiffusionObjective, StepRandom, batch_latents, call_unet,
                                                       diffusion_loss)
from library.training.settings import TextSettings, TrainSettings

logger = logging.getLogger(__name__)


class TextualInversionMethod:
    """Trains rows ``token_ids`` of ``models.text_encoders[0]``'s input embeddings."""

    loss_log_keys = ("loss", None)  # T logs `loss`, `lr`, `lr/d*lr` (spec cli-options §13)

    def __init__(self, models: SDModels, objective: DiffusionObjective, text: TextSettings, accelerator,
                 weight_dtype: torch.dtype, token_ids: list[int]):
        self.models, self.obj, self.text, self.acc = models, objective, text, accelerator
        self.weight_dtype = weight_dtype
        self.token_ids = token_ids
        self.module: torch.nn.Module = models.text_encoders[0]
        self.frozen: Optional[torch.Tensor] = None
        self.keep_rows: Optional[torch.Tensor] = None
        self.save_metadata: Optional[Callable[[], dict]] = None  # set by the runner (modelspec)
        self.save_dtype: Optional[torch.dtype] = None

    @classmethod
    def from_settings(cls, models: SDModels, settings: TrainSettings, accelerator, weight_dtype: torch.dtype,
                      token_ids: list[int]) -> "TextualInversionMethod":
        objective = DiffusionObjective.from_settings(settings.objective, models.vae.config.scaling_factor)
        return cls(models, objective, settings.text, accelerator, weight_dtype, token_ids)

    def attach(self, text_encoder: torch.nn.Module) -> None:
        """Use the prepared text encoder; remember the old rows to restore them after each step."""
        self.module = text_encoder
        weight = self._embedding_weight()
        self.frozen = weight.detach().clone()
        self.keep_rows = torch.arange(weight.shape[0], device=weight.device) < self.token_ids[0]

    def _embedding_weight(self) -> torch.nn.Parameter:
        return self.models.text_encoders[0].get_input_embeddings().weight

    # --- loss ---------------------------------------------------------------------------------
    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor:
        t, m = self.text, self.models
        with self.acc.autocast():
            cond = text_conditioning(m.family, [self.module], batch, clip_skip=t.clip_skip,
                                     max_token_length=t.max_token_length, device=self.acc.device,
                                     dtype=self.weight_dtype)
        latents = batch_latents(batch, m.vae, self.obj.latent_scale, self.acc.device, self.weight_dtype, rand.generator)
        with self.acc.autocast():
            return diffusion_loss(lambda x, t, c: call_unet(m.unet, x, t, c), latents, cond, batch, self.obj, rand)

    # --- loop hooks ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [self._embedding_weight()]

    def lr_log_names(self, n_groups: int) -> list[str]:
        return ["lr"] if n_groups == 1 else [f"lr/group{i}" for i in range(n_groups)]

    def on_epoch_start(self, epoch: int) -> None:
        self.models.text_encoders[0].train()

    def after_optimizer_step(self, state: TrainState) -> dict:
        """Put the old vocabulary's rows back (weight decay and momentum moved them), spec losses §10."""
        with torch.no_grad():
            weight = self._embedding_weight()
            weight[self.keep_rows] = self.frozen.to(weight.dtype)[self.keep_rows]
        return {}

    # --- saving ------------------------------------------------------------------------------------
    def vectors(self) -> torch.Tensor:
        """The trained vectors of the new tokens, (n, d)."""
        return self._embedding_weight()[self.token_ids[0]:self.token_ids[-1] + 1].detach().clone()

    def save(self, path: str, event: str, epoch: int, global_step: int) -> None:
        metadata = self.save_metadata() if self.save_metadata and path.endswith(".safetensors") else None
        save_embedding_file(path, embedding_state_dict(self.vectors()), metadata, self.save_dtype)
        logger.info("saved %s", path)
