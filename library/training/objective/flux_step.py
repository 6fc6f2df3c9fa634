"""One FLUX.1 training forward (sd-scripts' ``FluxNetworkTrainer.get_noise_pred_and_target`` + the shared loss).

Latents (AE sample, ``(z - shift) * scale``) -> noise and sigmas -> 2x2-packed noisy latents with their image
position ids -> diffusers' ``FluxTransformer2DModel`` (timestep = sigma, dev's guidance vector, CLIP-L pooled,
T5 tokens and, with ``--apply_t5_attn_mask``, the T5 key mask) -> unpacked prediction, prediction type,
target ``noise - latents`` -> element loss, weighting, mask, per-sample mean, loss weights, batch mean.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from library.errors import UserError
from library.sampling.flux_sampling import (FluxConditioning, image_ids, joint_attention_mask, pack_latents,
                                            unpack_latents)
from library.training.loop import nonfinite_guard
from library.training.objective.diffusion_step import StepRandom, batch_latents
from library.training.objective.flow_matching import (NUM_TRAIN_TIMESTEPS, FlowMatchingConfig, apply_prediction_type,
                                                      huber_c_for_sigmas, noisy_model_input, sample_sigmas)
from library.training.objective.losses import LossConfig, conditional_loss, loss_mask_from_batch, reduce_and_weight


class FlowValidationObjective:
    """What the validator (extras/validation.py) reads of an objective, for flow matching: timesteps 0..1000, its
    Huber options, and ``sched.scheduler.add_noise`` as the flow-matching mix (the loss mixes again from the
    noise and timesteps it is given)."""

    num_train_timesteps = NUM_TRAIN_TIMESTEPS
    alphas_cumprod = None  # --huber_schedule snr is refused for FLUX.1

    def __init__(self, noise_cfg):
        self.noise_cfg = noise_cfg
        self.sched = self
        self.scheduler = self

    @staticmethod
    def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        s = (timesteps.float() / NUM_TRAIN_TIMESTEPS).view(-1, *([1] * (latents.ndim - 1))).to(latents)
        return (1 - s) * latents + s * noise


def flux_latents(batch: Mapping[str, Any], ae, device, dtype, generator: torch.Generator) -> torch.Tensor:
    """The batch's latents as the FLUX.1 AE gives them: ``(sample - shift_factor) * scaling_factor``."""
    raw = batch_latents(batch, ae, 1.0, device, torch.float32, generator)
    return ((raw - ae.config.shift_factor) * ae.config.scaling_factor).to(dtype)


def call_flux(transformer, packed: torch.Tensor, timesteps: torch.Tensor, cond: FluxConditioning,
              guidance: Optional[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """The transformer on packed latents (B, rows * cols, 64); ``timesteps`` in [0, 1000] (diffusers' model takes
    t / 1000 and multiplies by 1000 inside, as BFL's does)."""
    dtype = getattr(transformer, "module", transformer).dtype
    if dtype.itemsize == 1:  # --fp8_base: fp8 storage, computed in the training dtype (fp8_storage.py)
        dtype = packed.dtype
    dev = packed.device
    kwargs = None
    if cond.t5_mask is not None:
        kwargs = {"attention_mask": joint_attention_mask(cond.t5_mask.to(dev), rows * cols)}
    return transformer(hidden_states=packed.to(dtype), timestep=(timesteps / 1000).to(dtype),
                       guidance=None if guidance is None else guidance.to(dtype),
                       pooled_projections=cond.pooled.to(dev, dtype), encoder_hidden_states=cond.t5.to(dev, dtype),
                       txt_ids=torch.zeros(cond.t5.shape[1], 3, device=dev, dtype=dtype),
                       img_ids=image_ids(rows, cols).to(dev, dtype), joint_attention_kwargs=kwargs,
                       return_dict=False)[0]


def flux_loss(transformer, latents: torch.Tensor, cond: FluxConditioning, batch: Mapping[str, Any],
              flow: FlowMatchingConfig, loss_cfg: LossConfig, rand: StepRandom, guidance_embeds: bool) -> torch.Tensor:
    """Scalar loss of one batch (``latents``: (B, 16, h, w), already shifted and scaled).

    ``rand.fixed`` (validation) gives the noise and timesteps t instead of drawing them: sigma = t / 1000."""
    nonfinite_guard.watch("text-encoder output", cond.t5)
    g = rand.generator
    bsz, _, h, w = latents.shape
    if rand.fixed is not None:
        given = rand.fixed(latents)
        noise, timesteps = given.noise.to(latents), given.timesteps.float()
        sigmas = timesteps / NUM_TRAIN_TIMESTEPS
    else:
        noise = torch.randn(latents.shape, generator=g, device=g.device).to(latents)
        sigmas, timesteps = sample_sigmas(flow, bsz, (h, w), g)
    noisy = noisy_model_input(latents, noise, sigmas.to(latents.device), flow, g)
    timesteps = timesteps.to(latents.device, latents.dtype)
    guidance = torch.full((bsz,), float(flow.guidance_scale), device=latents.device) if guidance_embeds else None
    packed = call_flux(transformer, pack_latents(noisy), timesteps, cond, guidance, h // 2, w // 2)
    nonfinite_guard.watch("transformer output", packed)
    pred = unpack_latents(packed, h, w)
    pred, weighting = apply_prediction_type(flow, pred, noisy, sigmas.to(latents.device))
    target = noise - latents
    huber_c = None if loss_cfg.loss_type == "l2" else \
        huber_c_for_sigmas(timesteps, loss_cfg.huber_schedule, loss_cfg.huber_c)
    elem = conditional_loss(pred.float(), target.float(), loss_cfg.loss_type, huber_c)
    if weighting is not None:
        elem = elem * weighting.to(elem.device, elem.dtype)
    mask = loss_mask_from_batch(batch, (h, w)) if loss_cfg.masked_loss else None
    if loss_cfg.masked_loss and mask is None:
        raise UserError("--masked_loss needs mask images: a ControlNet-style subset (conditioning_data_dir) "
                        "or alpha_mask = true")
    return reduce_and_weight(elem, timesteps, batch.get("loss_weights"), None, loss_cfg, mask)
