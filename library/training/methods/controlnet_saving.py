"""What train_controlnet.py writes: the ControlNet in the original (LDM) layout, or as a Diffusers folder.

* ``safetensors`` / ``ckpt`` / ``pt``: sd-scripts' file — the LDM ControlNet tensor names *without* the
  ``control_model.`` prefix (``input_blocks.*``, ``middle_block.*``, ``time_embed.*``, ``zero_convs.N.0.*``,
  ``input_hint_block.{0,2,...}.*``, ``middle_block_out.0.*``), no metadata, a plain ``torch.save`` dict for
  ckpt / pt. Diffusers' ``ControlNetModel.from_single_file`` and our gen_img read it.
* ``diffusers`` / ``diffusers_safetensors`` (beyond sd-scripts): ``ControlNetModel.save_pretrained`` layout
  (``config.json`` + ``diffusion_pytorch_model.bin`` / ``.safetensors``).
Every output is written under a temporary name and renamed.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import safetensors.torch
import torch

from library.fileio import atomic_path
from library.models.checkpoint_io import save_state_dict
from library.models.saving import WEIGHT_NAMES
from library.sampling.controlnet import LDM_PREFIX, control_net_to_ldm

logger = logging.getLogger(__name__)


def _cast(sd, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Detached CPU copies, floating-point tensors cast to ``dtype`` (None keeps theirs)."""
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu", copy=True)
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def controlnet_ldm_state_dict(controlnet, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """sd-scripts' saved layout: LDM names without ``control_model.``, on the CPU, cast to ``dtype``."""
    return _cast({k[len(LDM_PREFIX):]: v for k, v in control_net_to_ldm(controlnet).items()}, dtype)


def save_extension(save_model_as: Optional[str]) -> str:
    """Appended to output names: ``.safetensors`` / ``.ckpt`` / ``.pt``; a Diffusers folder has none."""
    choice = save_model_as or "safetensors"
    return "" if choice.startswith("diffusers") else "." + choice


class ControlNetSaver:
    """``save_model(path, event, epoch, global_step)`` for the Checkpointer: the ControlNet in the chosen format."""

    def __init__(self, controlnet: Callable[[], torch.nn.Module], save_model_as: Optional[str],
                 save_dtype: Optional[torch.dtype]):
        """``controlnet``: returns the unwrapped model at save time (the accelerator may wrap it)."""
        self.controlnet, self.save_dtype = controlnet, save_dtype
        self.choice = save_model_as or "safetensors"

    def __call__(self, path: str, event: str, epoch: int, global_step: int) -> None:
        model = self.controlnet()
        if self.choice.startswith("diffusers"):
            with atomic_path(path) as tmp:
                model.save_config(tmp)  # config.json, as save_pretrained writes it
                st_name, bin_name = WEIGHT_NAMES["diffusers"]
                state = _cast(model.state_dict(), self.save_dtype)  # a copy: the trained model stays as it is
                if self.choice == "diffusers_safetensors":
                    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                                                os.path.join(tmp, st_name), metadata={"format": "pt"})
                else:
                    torch.save(state, os.path.join(tmp, bin_name))
        else:
            save_state_dict(controlnet_ldm_state_dict(model, self.save_dtype), path)
        logger.info("saved %s", path)
