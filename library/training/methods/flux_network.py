"""FLUX.1 LoRA training (flux_train_network.py): the network method with FLUX.1's text encoding and loss.

What trains, the loop hooks and saving are :class:`~library.training.methods.network.NetworkMethod`'s; a batch
becomes a loss through CLIP-L (pooled) + T5-XXL on the batch's processed captions (sd-scripts' FLUX tokenizer:
77 CLIP tokens, ``--t5xxl_max_token_length`` T5 tokens) and the flow-matching objective (objective/flux_step.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from library.models.bundle import SDModels
from library.sampling.flux_sampling import FluxConditioning
from library.sampling.flux_text import CLIP_MAX_LENGTH, encode_flux_prompts
from library.training.methods.network import NetworkMethod, network_text_encoders
from library.training.objective.diffusion_step import StepRandom
from library.training.objective.flow_matching import FlowMatchingConfig
from library.training.objective.flux_step import FlowValidationObjective, flux_latents, flux_loss
from library.training.objective.losses import LossConfig
from library.training.objective.noise import NoiseConfig
from library.training.settings import TextSettings
from networks.network_host import NetworkHost


def cached_flux_outputs(cond: FluxConditioning, t5_attention_mask: torch.Tensor) -> dict:
    """A batch's encoder outputs in the text-encoder cache's slots (library/data/te_cache.py): T5 tokens as
    ``hidden_state1``, T5's attention mask as ``hidden_state2``, CLIP-L's pooled vector as ``pool2``."""
    return {"hidden_state1": cond.t5.float().cpu(), "hidden_state2": t5_attention_mask.cpu(),
            "pool2": cond.pooled.float().cpu()}


class FluxNetworkMethod(NetworkMethod):
    """Trains ``host.network`` (networks.lora_flux) on a frozen FLUX.1 transformer / CLIP-L / T5-XXL.

    ``models``: the transformer as ``unet``, the AE as ``vae``, ``text_encoders`` [CLIP-L, T5-XXL]."""

    def __init__(self, host: NetworkHost, models: SDModels, tokenizers: Sequence, flow: FlowMatchingConfig,
                 loss_cfg: LossConfig, text: TextSettings, accelerator, weight_dtype: torch.dtype, train_unet: bool,
                 train_text_encoder: bool, *, t5_max_length: int, apply_t5_attn_mask: bool, guidance_embeds: bool,
                 noise_cfg: Optional[NoiseConfig] = None, scale_weight_norms: Optional[float] = None):
        super().__init__(host, models, None, text, accelerator, weight_dtype, train_unet, train_text_encoder,
                         scale_weight_norms=scale_weight_norms)
        self.obj = FlowValidationObjective(noise_cfg)  # the validator's view of this objective
        self.tokenizers = list(tokenizers)  # [CLIP-L, T5]
        self.flow, self.loss_cfg = flow, loss_cfg
        self.t5_max_length, self.apply_t5_attn_mask = t5_max_length, apply_t5_attn_mask
        self.guidance_embeds = guidance_embeds

    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor:
        m, dev = self.models, self.acc.device
        self._set_batch_multiplier(batch)
        self.host.on_step_start(network_text_encoders(m), m.unet)
        cond = self._conditioning(batch)
        latents = flux_latents(batch, m.vae, dev, self.weight_dtype, rand.generator)
        with self.acc.autocast():
            return flux_loss(m.unet, latents, cond, batch, self.flow, self.loss_cfg, rand, self.guidance_embeds)

    def _conditioning(self, batch: dict) -> FluxConditioning:
        """Cached outputs (``cached_flux_outputs``) when the batch carries them, else CLIP-L + T5 on its captions."""
        dev = self.acc.device
        clip_l, t5xxl = self.models.text_encoders
        grad_te = self.train_text_encoder and torch.is_grad_enabled()
        if batch.get("text_encoder_outputs1_list") is not None:
            mask = batch["text_encoder_outputs2_list"].to(dev) if self.apply_t5_attn_mask else None
            pooled = batch["text_encoder_pool2_list"].to(dev)
            if self.train_text_encoder:  # CLIP-L trains: only T5-XXL's outputs are taken from the cache
                ids = self.tokenizers[0](list(batch["captions"]), max_length=CLIP_MAX_LENGTH, padding="max_length",
                                         truncation=True, return_tensors="pt").input_ids
                with torch.set_grad_enabled(grad_te), self.acc.autocast():
                    pooled = clip_l(ids.to(clip_l.device)).pooler_output
            return FluxConditioning(pooled=pooled, t5=batch["text_encoder_outputs1_list"].to(dev), t5_mask=mask)
        with torch.set_grad_enabled(grad_te), self.acc.autocast():
            return encode_flux_prompts(clip_l, t5xxl, self.tokenizers, batch["captions"], self.t5_max_length,
                                       self.apply_t5_attn_mask)
