"""ControlNet training (train_controlnet.py): a ControlNet learns to steer a frozen SD1/SD2 U-Net.

What trains: every parameter of the ControlNet (Diffusers' `ControlNetModel`, a copy of the U-Net encoder with
zero convs and a hint embedding). How a batch becomes a loss: the shared diffusion objective, where the U-Net's
prediction takes the ControlNet's residuals computed from the noisy latents, the timesteps, the text conditioning
and the batch's conditioning images (RGB in [-1, 1], as sd-scripts' ControlNet datasets give them).
What is saved: ``methods.controlnet_saving``.
"""
from __future__ import annotations

from typing import Iterable

import torch

from library.models.bundle import SDModels
from library.training.loop.checkpointing import TrainState
from library.training.objective.conditioning import TextConditioning, text_conditioning, weighted_captions_tokenizer
from library.training.objective.diffusion_step import DiffusionObjective, StepRandom, batch_latents, diffusion_loss
from library.training.settings import TextSettings


def call_unet_with_control(unet, controlnet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                           hint: torch.Tensor) -> torch.Tensor:
    """U-Net prediction with the ControlNet's residuals added (what diffusers' ControlNet pipelines do).

    Each model gets inputs in its own dtype: the trained ControlNet stays float32 under mixed precision (the CPU
    has no fp16 autocast), the frozen U-Net was cast to the training dtype.
    """
    c_dtype, u_dtype = next(controlnet.parameters()).dtype, unet.dtype  # the ControlNet may come DDP-wrapped
    down, mid = controlnet(noisy.to(c_dtype), timesteps, encoder_hidden_states=cond.context.to(c_dtype),
                           controlnet_cond=hint.to(c_dtype), return_dict=False)
    return unet(noisy.to(u_dtype), timesteps, cond.context.to(u_dtype),
                down_block_additional_residuals=[d.to(u_dtype) for d in down],
                mid_block_additional_residual=mid.to(u_dtype)).sample


class ControlNetMethod:
    """Trains ``controlnet`` (the accelerator-prepared module) on a frozen U-Net and text encoder."""

    loss_log_keys = ("loss/current", "loss/average")  # upstream's train_controlnet.py names

    def __init__(self, models: SDModels, controlnet: torch.nn.Module, objective: DiffusionObjective,
                 text: TextSettings, accelerator, weight_dtype: torch.dtype):
        self.models, self.obj, self.text, self.acc = models, objective, text, accelerator
        self.weight_dtype = weight_dtype
        self.weighted_tokenizer = weighted_captions_tokenizer(models, text.weighted_captions)
        self.module: torch.nn.Module = controlnet

    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor:
        m, t, dev = self.models, self.text, self.acc.device
        with torch.no_grad(), self.acc.autocast():
            cond = text_conditioning(m.family, m.text_encoders, batch, clip_skip=t.clip_skip,
                                     max_token_length=t.max_token_length, device=dev, dtype=self.weight_dtype,
                                     weighted_tokenizer=self.weighted_tokenizer)
        latents = batch_latents(batch, m.vae, self.obj.latent_scale, dev, self.weight_dtype, rand.generator)
        hint = batch["conditioning_images"].to(dev)
        with self.acc.autocast():
            return diffusion_loss(lambda x, ts, c: call_unet_with_control(m.unet, self.module, x, ts, c, hint),
                                  latents, cond, batch, self.obj, rand)

    # --- loop hooks ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def lr_log_names(self, n_groups: int) -> list[str]:
        return ["lr"] + [f"lr/group{i}" for i in range(1, n_groups)]  # upstream logs one "lr"

    def on_epoch_start(self, epoch: int) -> None:
        self.module.train()

    def after_optimizer_step(self, state: TrainState) -> dict:
        return {}
