"""ControlNet-LLLite training (sdxl_train_control_net_lllite.py): small hint-conditioned modules on a frozen SDXL.

What trains: the LLLite network (``lllite_network.LLLiteNetwork``). How a batch becomes a loss: each module
embeds the batch's conditioning images (RGB in [-1, 1]) once, then the shared SDXL diffusion objective runs with
the modules hooked into the U-Net. What is saved: the modules' tensors under upstream's names, with modelspec
(architecture ``stable-diffusion-xl-v1-base/control-net-lllite``, as upstream writes it) in ``.safetensors``.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch

from library.models.bundle import SDModels
from library.models.checkpoint_io import save_state_dict
from library.training.loop.checkpointing import TrainState
from library.training.methods.lllite_network import LLLiteNetwork
from library.training.objective.conditioning import text_conditioning
from library.training.objective.diffusion_step import (DiffusionObjective, StepRandom, batch_latents, call_unet,
                                                       diffusion_loss)
from library.training.settings import TextSettings

logger = logging.getLogger(__name__)

ARCHITECTURE = "stable-diffusion-xl-v1-base/control-net-lllite"  # upstream's modelspec.architecture


class LLLiteMethod:
    """Trains ``network`` (hooked into the frozen ``models.unet``); ``module`` is its prepared wrapper."""

    manual_grad_sync = True  # the network's forward is never called through its DDP wrapper (hooks + embed)

    def __init__(self, models: SDModels, network: LLLiteNetwork, objective: DiffusionObjective, text: TextSettings,
                 accelerator, weight_dtype: torch.dtype):
        self.models, self.network, self.obj, self.text = models, network, objective, text
        self.acc, self.weight_dtype = accelerator, weight_dtype
        self.module: torch.nn.Module = network
        self.save_dtype: Optional[torch.dtype] = None
        self.save_metadata: Callable[[], dict] = dict

    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor:
        m, t, dev = self.models, self.text, self.acc.device
        with torch.no_grad(), self.acc.autocast():
            cond = text_conditioning(m.family, m.text_encoders, batch, clip_skip=t.clip_skip,
                                     max_token_length=t.max_token_length, device=dev, dtype=self.weight_dtype)
        latents = batch_latents(batch, m.vae, self.obj.latent_scale, dev, self.weight_dtype, rand.generator)
        with self.acc.autocast():
            # kept until the next batch: gradient checkpointing recomputes the hooked layers in the backward pass
            self.network.cond = self.network.embed(batch["conditioning_images"].to(dev))
            return diffusion_loss(lambda x, ts, c: call_unet(m.unet, x, ts, c), latents, cond, batch, self.obj, rand)

    # --- loop hooks ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def lr_log_names(self, n_groups: int) -> list[str]:
        return ["lr"] + [f"lr/group{i}" for i in range(1, n_groups)]  # upstream logs one "lr"

    def on_epoch_start(self, epoch: int) -> None:
        self.network.train()

    def after_optimizer_step(self, state: TrainState) -> dict:
        return {}

    # --- saving ------------------------------------------------------------------------------------
    def save(self, path: str, event: str, epoch: int, global_step: int) -> None:
        """Upstream's ``save_lllite_weights``: the module tensors (cast to ``--save_precision``), modelspec in
        ``.safetensors``, a plain ``torch.save`` dict for ``.ckpt`` / ``.pt``; written atomically."""
        sd = {}
        for k, v in self.network.state_dict().items():
            v = v.detach().to("cpu", copy=True)
            sd[k] = v.to(self.save_dtype) if self.save_dtype is not None else v
        metadata = self.save_metadata() if path.endswith(".safetensors") else None
        save_state_dict(sd, path, metadata=metadata)
        logger.info("saved %s", path)
