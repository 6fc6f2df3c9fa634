"""Whole-model saving of train_db.py / fine_tune.py (spec cli-options §7, file-formats §b.3, §e, §f).

* Format: ``--save_model_as`` ckpt / safetensors / diffusers / diffusers_safetensors, or None = the same
  kind as the source (single file -> ``.ckpt``, or ``.safetensors`` with ``--use_safetensors``; folder ->
  Diffusers). ``--use_safetensors`` also turns ``ckpt`` into ``.safetensors`` (sd-scripts' rule).
* ``.safetensors`` carries only modelspec (kind ``checkpoint``); ``.ckpt`` is ``{"state_dict", "epoch",
  "global_step"}`` with epoch/step **added** to the source checkpoint's stored values (§e).
* A single-file source keeps its extra tensors (EMA, schedule buffers, ...): the keys outside the parts we
  write are listed once, and read from the source only while a file is being saved (§f).
* Diffusers output takes scheduler and tokenizers from the source folder when the source is one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from library.models.architectures import TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIX
from library.models.bundle import SDModels
from library.models.checkpoint_io import CheckpointReader
from library.models.saving import save_diffusers, save_ldm_checkpoint

logger = logging.getLogger(__name__)

SAVE_MODEL_AS = (None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors")


@dataclass(frozen=True)
class SaveFormat:
    """Where a whole model goes: one LDM file or a Diffusers folder, safetensors or pickle weights."""

    diffusers: bool
    use_safetensors: bool

    @property
    def ext(self) -> str:
        """Appended to output names; a Diffusers folder has none."""
        if self.diffusers:
            return ""
        return ".safetensors" if self.use_safetensors else ".ckpt"


def resolve_save_format(save_model_as: Optional[str], use_safetensors: bool, source_is_file: bool) -> SaveFormat:
    """sd-scripts' rule (spec cli-options §7): None follows the source; "safetensors" in the name forces it."""
    if save_model_as is None:
        return SaveFormat(diffusers=not source_is_file, use_safetensors=bool(use_safetensors))
    choice = save_model_as.lower()
    return SaveFormat(diffusers=choice.startswith("diffusers"),
                      use_safetensors=bool(use_safetensors) or "safetensors" in choice)


def ckpt_epoch(event: str, epoch: int) -> int:
    """The ``epoch`` stored in a ``.ckpt`` (spec file-formats §e), from what :class:`Checkpointer` passes.

    Step saves get the 0-based current epoch, epoch saves the number of finished epochs, the final save
    the last epoch index (the Checkpointer passes the epoch count there).
    """
    if event == "epoch":
        return epoch + 1
    if event == "final":
        return max(0, epoch - 1)
    return epoch


def _written_prefixes(family: str) -> tuple[str, ...]:
    return (UNET_PREFIX, VAE_PREFIX, *(prefix for prefix, _ in TEXT_ENCODERS[family]))


class SourceCheckpoint:
    """What a single-file source contributes to every save: extra keys and stored epoch / global_step."""

    def __init__(self, path: Optional[str], family: str):
        self.path = path if path and os.path.isfile(path) else None
        self.extra_keys: list[str] = []
        self.epoch = self.global_step = 0
        if self.path is None:
            return

        reader = CheckpointReader(self.path)
        try:
            prefixes = _written_prefixes(family)
            # keys under the model prefixes are written from the models (SD2's unused TE block included, via
            # te_extras); everything else (model_ema.*, betas, alphas_cumprod, ...) is carried over
            self.extra_keys = [k for k in reader.keys() if not k.startswith(prefixes)]
            self.epoch = int(reader.metadata.get("epoch", 0) or 0)
            self.global_step = int(reader.metadata.get("global_step", 0) or 0)
        finally:
            reader.close()
        if self.extra_keys:
            logger.info("%s: %d extra tensors (e.g. %s) will be kept in saved checkpoints", self.path,
                        len(self.extra_keys), self.extra_keys[0])

    def read_extra(self) -> dict[str, torch.Tensor]:
        """The extra tensors, read now (only for the duration of one save)."""
        if not self.extra_keys:
            return {}

        reader = CheckpointReader(self.path)
        try:
            return {k: reader.get(k) for k in self.extra_keys}
        finally:
            reader.close()


class FullModelSaver:
    """``save_model(path, event, epoch, global_step)`` for :class:`Checkpointer`: the whole model set."""

    def __init__(self, models: SDModels, source: str, fmt: SaveFormat, save_dtype: Optional[torch.dtype],
                 modelspec: Callable[[], dict[str, str]]):
        """``source``: the base model (``--pretrained_model_name_or_path``): its extra keys, epoch and step."""
        self.models, self.fmt, self.save_dtype, self.modelspec = models, fmt, save_dtype, modelspec
        # sharded training (runners/sharded.py): the models with the trained parts' gathered full weights
        self.models_to_save: Callable[[], SDModels] = lambda: self.models
        self.reference = source if os.path.isdir(source) else None
        self.source = SourceCheckpoint(source, models.family)

    def __call__(self, path: str, event: str, epoch: int, global_step: int) -> None:
        models = self.models_to_save()
        if self.fmt.diffusers:
            save_diffusers(models, path, self.save_dtype, reference_model=self.reference,
                           use_safetensors=self.fmt.use_safetensors)
            return
        metadata = self.modelspec() if self.fmt.use_safetensors else None
        save_ldm_checkpoint(models, path, self.save_dtype, metadata=metadata,
                            epoch=self.source.epoch + ckpt_epoch(event, epoch),
                            global_step=self.source.global_step + global_step,
                            source_extra=self.source.read_extra())
