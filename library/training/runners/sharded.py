"""Sharded data-parallel training of the whole-model trainers (train_db, fine_tune, sdxl_train): accelerate's FSDP
(version 2, ``accelerate launch --use_fsdp --fsdp_version 2``) or DeepSpeed (``--deepspeed``).

Both take one model with its optimizer in one ``prepare`` call (accelerate refuses several models under FSDP2, and
DeepSpeed shards the optimizer with the model), so the trained models travel as one :class:`TrainedBundle`, as
sd-scripts' ``prepare_deepspeed_model`` does. The method calls each part through the prepared bundle
(:class:`BundledPart`), so the wrapper's hooks gather the shards before a forward and reduce the gradients after
the backward. Saving gathers the full weights on every process (a collective) and writes on the main process only
(:class:`ShardedWeights`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any, Optional

import torch
from accelerate.utils import DistributedType

from library.errors import UserError
from library.models.bundle import SDModels

logger = logging.getLogger(__name__)

def launched_sharding(args: argparse.Namespace) -> Optional[str]:
    """``"fsdp"`` / ``"deepspeed"`` as the launch asks for it (before the accelerator exists), or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if getattr(args, "deepspeed", False) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def check_sharded_options(args: argparse.Namespace) -> None:
    """What sharded training cannot do yet, refused with one line before any model loads.

    Under FSDP (and DeepSpeed ZeRO 3) no process holds whole weights between steps: the EMA's shadow copies,
    sample images and validation would read shards. FSDP1 needs the trained models wrapped one by one, which
    accelerate cannot do with one optimizer."""
    kind = launched_sharding(args)
    if kind is None:
        return
    if kind == "fsdp" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP needs version 2 here: launch with accelerate launch --use_fsdp --fsdp_version 2 "
                        "(FSDP1 cannot wrap the U-Net and text encoders with one optimizer)")
    if kind == "deepspeed" and getattr(args, "zero_stage", 2) < 3:
        return  # ZeRO 0-2 keep whole weights on every process
    if kind == "deepspeed" and not getattr(args, "zero3_save_16bit_model", False):
        # DeepSpeed gathers ZeRO 3 shards into a state dict only with this flag: without it the first save fails
        raise UserError("--zero_stage 3 needs --zero3_save_16bit_model: DeepSpeed gathers the sharded weights "
                        "for a save only with it (they keep their training dtype)")
    where = "FSDP" if kind == "fsdp" else "DeepSpeed ZeRO 3"
    problems = [(getattr(args, "ema", False), "--ema"), (bool(getattr(args, "sample_prompts", None)), "--sample_prompts"),
                ((getattr(args, "validation_split", 0) or 0) > 0, "--validation_split")]
    for bad, option in problems:
        if bad:
            raise UserError(f"{option} cannot be used with {where}: the weights are sharded over the processes")


def sharding(accelerator) -> Optional[str]:
    """``"fsdp"`` / ``"deepspeed"`` when the accelerator shards the trained models, else None."""
    kind = getattr(accelerator, "distributed_type", None)
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return None


class TrainedBundle(torch.nn.Module):
    """The trained models as one module; ``bundle(name, *args)`` runs part ``name``."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleDict(parts)

    def forward(self, name: str, *args, **kwargs):
        return self.parts[name](*args, **kwargs)


class BundledPart:
    """Stands in for one trained model: calls go through the prepared bundle (so the sharding wrapper sees them),
    attributes (``config``, ``dtype``, ``device``, submodules) come from the model itself."""

    def __init__(self, prepared: Any, name: str, module: torch.nn.Module):
        self._prepared, self._name, self._module = prepared, name, module

    def __call__(self, *args, **kwargs):
        return self._prepared(self._name, *args, **kwargs)

    def __getattr__(self, attr: str):
        return getattr(self._module, attr)


class _FullWeights:
    """What the savers read of a model: its ``config`` and a ``state_dict()`` of gathered tensors."""

    def __init__(self, module: torch.nn.Module, state: dict[str, torch.Tensor]):
        self.config, self._state = module.config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class ShardedWeights:
    """Gathers the bundle's full weights for a save: :meth:`gather` on every process, then the main process
    saves :meth:`models_for_saving` (the trained models replaced by their gathered weights)."""

    def __init__(self, accelerator, prepared: Any, parts: dict[str, torch.nn.Module]):
        self.acc, self.prepared, self.parts = accelerator, prepared, parts
        self._full: Optional[dict[str, dict[str, torch.Tensor]]] = None

    def gather(self) -> None:
        state = self.acc.get_state_dict(self.prepared)  # a collective: every process takes part
        if not self.acc.is_main_process:
            return
        full: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.parts}
        for key, value in state.items():
            _, name, rest = key.split(".", 2)  # parts.<name>.<key>
            full[name][rest] = value.detach().cpu()
        self._full = full

    def models_for_saving(self, models: SDModels) -> SDModels:
        """``models`` with the trained parts replaced by the gathered weights of the last :meth:`gather`."""
        if self._full is None:
            raise RuntimeError("ShardedWeights.models_for_saving before gather")
        full, self._full = self._full, None
        swap = {id(m): _FullWeights(m, full[name]) for name, m in self.parts.items()}
        return dataclasses.replace(models, unet=swap.get(id(models.unet), models.unet),
                                   text_encoders=[swap.get(id(te), te) for te in models.text_encoders])


def prepare_bundle(accelerator, parts: dict[str, torch.nn.Module], optimizer, lr_scheduler):
    """Prepare the trained ``parts`` as one bundle with the optimizer and schedule.

    Returns ``(stand-ins by name, prepared bundle, optimizer, schedule, ShardedWeights)``."""
    logger.info("%s: %s prepared as one sharded module", sharding(accelerator), ", ".join(parts))
    prepared, optimizer, lr_scheduler = accelerator.prepare(TrainedBundle(parts), optimizer, lr_scheduler)
    stand_ins = {name: BundledPart(prepared, name, m) for name, m in parts.items()}
    return stand_ins, prepared, optimizer, lr_scheduler, ShardedWeights(accelerator, prepared, parts)
