"""EMA of the trained weights (``--ema``), with diffusers' ``EMAModel`` warm-up (docs/beyond-sd-scripts.md §2).

After optimizer step ``n`` (every ``--ema_every_n_steps``): ``shadow -= (1 - d(n)) * (shadow - param)`` with
``d(n) = min(ema_decay, (1 + s) / (10 + s))``, or ``1 - (1 + s) ** -ema_power`` with ``--ema_power``
(diffusers' ``use_ema_warmup``, inv_gamma 1), where ``s = n - ema_update_after_step - 1``; ``d = 0`` (a copy)
while ``s <= 0``. That is ``EMAModel.get_decay`` with its step counted in optimizer steps.
Frozen parameters (a text encoder after ``--stop_text_encoder_training``) are copied, as EMAModel does.
The shadow is float32, on the training device or (``--ema_device cpu``) in host memory; it is saved in the
state folder (``ema.safetensors``) so ``--resume`` continues it exactly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Iterator, Optional, Sequence

import safetensors.torch  # called through the module: fault-injection tests patch save_file there
import torch
from safetensors import safe_open

from library.errors import UserError
from library.training.settings import EmaSettings

logger = logging.getLogger(__name__)

STATE_FILE = "ema.safetensors"


class EMA:
    """Shadow copies of a fixed list of parameters."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float = 0.9999, update_after_step: int = 0,
                 power: Optional[float] = None, every_n_steps: int = 1, device: Optional[torch.device] = None):
        if not 0.0 <= decay <= 1.0:
            raise UserError(f"--ema_decay must be within 0 and 1, got {decay}")
        if every_n_steps < 1:
            raise UserError(f"--ema_every_n_steps must be at least 1, got {every_n_steps}")
        self.params = list(params)
        self.decay, self.update_after_step, self.power = decay, update_after_step, power
        self.every_n_steps = every_n_steps
        self.shadow = [p.detach().to(device or p.device, torch.float32, copy=True) for p in self.params]
        self.last_step = 0

    def decay_at(self, step: int) -> float:
        """diffusers ``EMAModel.get_decay(step)`` with ``min_decay`` 0 and ``inv_gamma`` 1."""
        s = max(0, step - self.update_after_step - 1)
        if s <= 0:
            return 0.0
        value = 1 - (1 + s) ** -self.power if self.power is not None else (1 + s) / (10 + s)
        return min(value, self.decay)

    @torch.no_grad()
    def after_step(self, global_step: int) -> dict:
        """Update after optimizer step ``global_step`` when it is due; logs ``ema/decay``."""
        if global_step % self.every_n_steps:
            return {}
        decay = self.decay_at(global_step)
        for shadow, param in zip(self.shadow, self.params):
            value = param.detach().to(shadow.device, torch.float32)
            if param.requires_grad:
                shadow.sub_((1 - decay) * (shadow - value))  # EMAModel.step's exact expression
            else:
                shadow.copy_(value)
        self.last_step = global_step
        return {"ema/decay": decay}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Put the EMA weights into the parameters for the duration (saving, sampling), then restore them.

        The training weights wait in host memory, so swapping costs no accelerator memory.
        """
        backup = [p.detach().to("cpu", copy=True) for p in self.params]
        try:
            with torch.no_grad():
                for shadow, param in zip(self.shadow, self.params):
                    param.copy_(shadow.to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(backup, self.params):
                    param.copy_(saved.to(param.device))

    # --- state folder (resume) -------------------------------------------------------------------
    def save_to_folder(self, folder: str) -> None:
        tensors = {f"shadow.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}
        meta = {"last_step": str(self.last_step), "config": json.dumps(
            {"decay": self.decay, "update_after_step": self.update_after_step, "power": self.power,
             "every_n_steps": self.every_n_steps})}
        safetensors.torch.save_file(tensors, os.path.join(folder, STATE_FILE), metadata=meta)

    def load_from_folder(self, folder: str) -> bool:
        """Restore the shadow of a ``--resume`` folder; False (and a warning) when it has none."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            logger.warning("%s has no EMA (%s): the EMA starts from the resumed weights", folder, STATE_FILE)
            return False
        with safe_open(path, "pt") as f:
            keys = sorted(f.keys(), key=lambda k: int(k.split(".")[1]))
            if len(keys) != len(self.shadow):
                raise UserError(f"--resume {folder}: the EMA holds {len(keys)} tensors, this run trains "
                                f"{len(self.shadow)}")
            for key, shadow in zip(keys, self.shadow):
                value = f.get_tensor(key)
                if value.shape != shadow.shape:
                    raise UserError(f"--resume {folder}: EMA tensor {key} has shape {tuple(value.shape)}, "
                                    f"expected {tuple(shadow.shape)}")
                shadow.copy_(value.to(shadow.device, shadow.dtype))
            self.last_step = int(f.metadata().get("last_step", 0))
        logger.info("restored the EMA from %s (last update at step %d)", path, self.last_step)
        return True


def ema_name(stem: str) -> str:
    """``<output_name>-ema``: the EMA file sits beside the model with the same extension."""
    return stem + "-ema"


def ema_from_settings(settings: EmaSettings, params: Sequence[torch.nn.Parameter], device: torch.device
                      ) -> Optional[EMA]:
    """The run's EMA, or None without ``--ema``."""
    if not settings.enabled:
        if settings.sample_with_ema:
            raise UserError("--sample_with_ema needs --ema")
        return None
    where = torch.device("cpu") if settings.device == "cpu" else device
    ema = EMA(params, settings.decay, settings.update_after_step, settings.power, settings.every_n_steps, where)
    n = sum(s.numel() for s in ema.shadow)
    logger.info("EMA of %d tensors (%.1fM values) on %s, decay %s", len(ema.shadow), n / 1e6, where, settings.decay)
    return ema
