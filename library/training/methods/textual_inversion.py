"""Textual Inversion (train_textual_inversion.py, sdxl_train_textual_inversion.py): only the new tokens'
embedding rows learn, in every text encoder of the model (one for SD 1.x / 2.x, two for SDXL).

What trains: each text encoder's whole input-embedding weight goes to the optimizer (as upstream, so optimizer
state and LR groups look the same: one group, both SDXL tables in it), and after every optimizer step the rows
of the old vocabulary are copied back from a frozen copy (spec losses §10, cli-options §12 T). Everything else in
the text encoders and the U-Net is frozen. Loss letter "T": prior weights, masks and v_pred_like_loss (spec losses §8).
Saved: the new rows as ``{"emb_params": T[n, d]}``, or for SDXL ``{"clip_l": T[n, 768], "clip_g": T[n, 1280]}``
(spec file-formats §c).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch

from library.formats.ti_embedding import embedding_state_dict, save_embedding_file, sdxl_embedding_state_dict
from library.models.bundle import SDModels
from library.training.loop.checkpointing import TrainState
from library.training.objective.conditioning import text_conditioning
from library.training.objective.diffusion_step import (DiffusionObjective, StepRandom, batch_latents, call_unet,
                                                       diffusion_loss)
from library.training.settings import TextSettings, TrainSettings

logger = logging.getLogger(__name__)


class TextualInversionMethod:
    """Trains rows ``token_ids[i]`` of ``models.text_encoders[i]``'s input embeddings, for every encoder i."""

    loss_log_keys = ("loss", None)  # T logs `loss`, `lr`, `lr/d*lr` (spec cli-options §13)

    def __init__(self, models: SDModels, objective: DiffusionObjective, text: TextSettings, accelerator,
                 weight_dtype: torch.dtype, token_ids: list[list[int]]):
        if len(token_ids) != len(models.text_encoders):
            raise ValueError(f"{len(token_ids)} token id lists for {len(models.text_encoders)} text encoders")
        self.models, self.obj, self.text, self.acc = models, objective, text, accelerator
        self.weight_dtype = weight_dtype
        self.token_ids = token_ids
        self.modules: list[torch.nn.Module] = list(models.text_encoders)  # every prepared encoder
        self.module: torch.nn.Module = self.modules[0]  # the loop protocol's one module
        self.frozen: list[torch.Tensor] = []
        self.keep_rows: list[torch.Tensor] = []
        self.save_metadata: Optional[Callable[[], dict]] = None  # set by the runner (modelspec)
        self.save_dtype: Optional[torch.dtype] = None

    @classmethod
    def from_settings(cls, models: SDModels, settings: TrainSettings, accelerator, weight_dtype: torch.dtype,
                      token_ids: list[list[int]]) -> "TextualInversionMethod":
        objective = DiffusionObjective.from_settings(settings.objective, models.vae.config.scaling_factor)
        return cls(models, objective, settings.text, accelerator, weight_dtype, token_ids)

    def attach(self, text_encoders: list[torch.nn.Module]) -> None:
        """Use the prepared text encoders; remember the old rows to restore them after each step."""
        self.modules = list(text_encoders)
        self.module = self.modules[0]
        self.frozen, self.keep_rows = [], []
        for weight, ids in zip(self._embedding_weights(), self.token_ids):
            self.frozen.append(weight.detach().clone())
            self.keep_rows.append(torch.arange(weight.shape[0], device=weight.device) < ids[0])

    def _embedding_weights(self) -> list[torch.nn.Parameter]:
        return [te.get_input_embeddings().weight for te in self.models.text_encoders]

    # --- loss ---------------------------------------------------------------------------------
    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor:
        t, m = self.text, self.models
        with self.acc.autocast():
            cond = text_conditioning(m.family, self.modules, batch, clip_skip=t.clip_skip,
                                     max_token_length=t.max_token_length, device=self.acc.device,
                                     dtype=self.weight_dtype)
        latents = batch_latents(batch, m.vae, self.obj.latent_scale, self.acc.device, self.weight_dtype, rand.generator)
        with self.acc.autocast():
            return diffusion_loss(lambda x, t, c: call_unet(m.unet, x, t, c), latents, cond, batch, self.obj, rand)

    # --- loop hooks ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return self._embedding_weights()

    def lr_log_names(self, n_groups: int) -> list[str]:
        return ["lr"] if n_groups == 1 else [f"lr/group{i}" for i in range(n_groups)]

    def on_epoch_start(self, epoch: int) -> None:
        for te in self.models.text_encoders:
            te.train()

    def after_optimizer_step(self, state: TrainState) -> dict:
        """Put the old vocabulary's rows back (weight decay and momentum moved them), spec losses §10."""
        with torch.no_grad():
            for weight, frozen, keep in zip(self._embedding_weights(), self.frozen, self.keep_rows):
                weight[keep] = frozen.to(weight.dtype)[keep]
        return {}

    # --- saving ------------------------------------------------------------------------------------
    def vectors(self) -> list[torch.Tensor]:
        """The trained vectors of the new tokens, (n, d) per text encoder."""
        return [w[ids[0]:ids[-1] + 1].detach().clone() for w, ids in zip(self._embedding_weights(), self.token_ids)]

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        """The embedding file's tensors: ``emb_params``, or SDXL's ``clip_l`` (TE1) and ``clip_g`` (TE2)."""
        vectors = self.vectors()
        if self.models.family == "sdxl":
            return sdxl_embedding_state_dict(*vectors)
        return embedding_state_dict(vectors[0])

    def save(self, path: str, event: str, epoch: int, global_step: int) -> None:
        metadata = self.save_metadata() if self.save_metadata and path.endswith(".safetensors") else None
        save_embedding_file(path, self.state_dict_to_save(), metadata, self.save_dtype)
        logger.info("saved %s", path)
