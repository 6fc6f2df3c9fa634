"""Network training (LoRA and any --network_module plug-in): train_network.py / sdxl_train_network.py.

The method object of the shared loop: what trains (the network's parameters), how a batch becomes
a loss (shared diffusion objective), and what is saved (the network file with ss_* metadata).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch

from library.models.bundle import SDModels
from library.training.loop.checkpointing import TrainState
from library.training.objective.conditioning import text_conditioning, weighted_captions_tokenizer
from library.training.objective.diffusion_step import (DiffusionObjective, StepRandom, batch_latents, call_unet,
                                                       diffusion_loss)
from library.training.settings import TextSettings
from networks.network_host import NetworkHost

logger = logging.getLogger(__name__)


def network_text_encoders(models: SDModels):
    """The text-encoder argument of the plug-in API: the one encoder (SD1/SD2) or the list (SDXL, FLUX.1)."""
    return models.text_encoders if len(models.text_encoders) > 1 else models.text_encoders[0]


class NetworkMethod:
    """Trains ``host.network`` on frozen U-Net / text encoders."""

    manual_grad_sync = True  # the network is never called through its DDP wrapper

    def __init__(self, host: NetworkHost, models: SDModels, objective: DiffusionObjective, text: TextSettings,
                 accelerator, weight_dtype: torch.dtype, train_unet: bool, train_text_encoder: bool,
                 scale_weight_norms: Optional[float] = None):
        self.host, self.models, self.obj, self.text = host, models, objective, text
        self.scale_weight_norms = scale_weight_norms
        self.acc, self.weight_dtype = accelerator, weight_dtype
        self.train_unet, self.train_text_encoder = train_unet, train_text_encoder
        # --weighted_captions (SD1/SD2)
        self.weighted_tokenizer = weighted_captions_tokenizer(models, text.weighted_captions)
        self.module: torch.nn.Module = host.network
        self.save_metadata: Optional[Callable[[str, int], dict]] = None  # set by the runner
        self.save_dtype: Optional[torch.dtype] = None

    # --- loss ---------------------------------------------------------------------------------
    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor:
        m, t, dev = self.models, self.text, self.acc.device
        self._set_batch_multiplier(batch)
        self.host.on_step_start(network_text_encoders(m), m.unet)
        grad_te = self.train_text_encoder and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad_te), self.acc.autocast():
            cond = text_conditioning(m.family, m.text_encoders, batch, clip_skip=t.clip_skip,
                                     max_token_length=t.max_token_length, device=dev, dtype=self.weight_dtype,
                                     weighted_tokenizer=self.weighted_tokenizer)
        latents = batch_latents(batch, m.vae, self.obj.latent_scale, dev, self.weight_dtype, rand.generator)
        with self.acc.autocast():
            return diffusion_loss(lambda x, t, c: call_unet(m.unet, x, t, c), latents, cond, batch, self.obj, rand)

    def _set_batch_multiplier(self, batch: dict) -> None:
        mults = batch.get("network_multipliers")
        if mults is None:
            return
        values = set(float(v) for v in torch.as_tensor(mults).flatten().tolist())
        if len(values) > 1:
            raise NotImplementedError("datasets with different network_multiplier in one batch")
        self.host.set_multiplier(values.pop())

    # --- loop hooks ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def lr_log_names(self, n_groups: int) -> list[str]:
        """sd-scripts' names: lr/textencoder and lr/unet, or lr/group{i} for block-wise groups."""
        if n_groups == 2 and self.train_text_encoder and self.train_unet:
            return ["lr/textencoder", "lr/unet"]
        if n_groups == 1:
            return ["lr/unet" if self.train_unet else "lr/textencoder"]
        return [f"lr/group{i}" for i in range(n_groups)]

    def on_epoch_start(self, epoch: int) -> None:
        m = self.models
        self.module.train()
        self.host.on_epoch_start(network_text_encoders(m), m.unet)

    def after_optimizer_step(self, state: TrainState) -> dict:
        max_norm = self.scale_weight_norms
        if not max_norm:
            return {}
        result = self.host.apply_max_norm_regularization(max_norm, self.acc.device)
        if result is None:
            return {}
        keys_scaled, mean_norm, maximum = result
        return {"max_norm/keys_scaled": keys_scaled, "max_norm/average_key_norm": mean_norm,
                "max_norm/max_key_norm": maximum}

    # --- saving ------------------------------------------------------------------------------------
    def save(self, path: str, event: str, epoch: int, global_step: int) -> None:
        metadata = self.save_metadata(event, epoch, global_step) if self.save_metadata else {}
        network = self.acc.unwrap_model(self.module)
        network.save_weights(path, self.save_dtype, metadata if path.endswith(".safetensors") else None)
        logger.info("saved %s", path)
