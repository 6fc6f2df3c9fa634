"""LoRA-FA (Zhang et al. 2023, arXiv:2308.03303) as a ``--network_module`` plug-in: sd-scripts' ``networks.lora_fa``.

The down projection is drawn once from N(0, 2 / (in + rank)) and stays frozen; only the up projection trains.
The file layout, names, options and block-wise arguments are those of ``networks.lora``, so any LoRA loader
(diffusers, gen_img, merge_lora) reads the result. Two differences from sd-scripts v0.8.7, both on purpose:
the frozen factor gets no gradient at all (upstream computes one and leaves it out of the optimizer, which
costs memory and lets it enter ``--max_grad_norm``'s norm), and the max-norm constraint scales the up
projection alone (upstream also rescales the frozen factor).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from . import lora
from .lora_modules import LoRAModule


class LoRAFAModule(LoRAModule):
    """A LoRA module whose ``lora_down`` is a fixed random projection."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        org = self.org_module
        in_dim = org.in_channels if isinstance(org, nn.Conv2d) else org.in_features
        # the paper's init for the frozen factor; upstream uses the channel count, not fan-in, for convs too
        nn.init.normal_(self.lora_down.weight, std=math.sqrt(2.0 / (in_dim + self.lora_dim)))
        self.lora_down.weight.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True) -> "LoRAFAModule":
        self.lora_up.requires_grad_(requires_grad)
        self.lora_down.requires_grad_(False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.lora_up.weight]

    @torch.no_grad()
    def scale_factors(self, ratio: torch.Tensor) -> None:
        self.lora_up.weight.mul_(ratio.to(self.lora_up.weight))


class LoRAFANetwork(lora.LoRANetwork):
    module_class = LoRAFAModule


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs: str) -> LoRAFANetwork:
    """As ``networks.lora.create_network`` (same ``--network_args``), with frozen down projections."""
    return lora.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout,
                               network_class=LoRAFANetwork, **kwargs)


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: str) -> tuple[LoRAFANetwork, Mapping[str, torch.Tensor]]:
    return lora.create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd, for_inference,
                                            network_class=LoRAFANetwork, **kwargs)


__all__ = ["create_network", "create_network_from_weights", "LoRAFANetwork", "LoRAFAModule"]
