"""``--fp8_base``: frozen Linear / Conv weights stored in float8_e4m3fn, computed in the training dtype.

Each forward upcasts the stored weight into a new tensor (``weight.to(x.dtype)``); the parameter itself is
never changed. That is what makes it safe with gradient checkpointing: a recomputed layer sees exactly the
tensors the first pass saw (diffusers' layerwise casting swaps the parameter's storage in hooks, and
checkpointing's recomputation then finds fp8 where it saved bf16 and stops). Norms, embeddings and biases
keep the training dtype: they are small, and fp8 would cost them most.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.weight.to(x.dtype), bias)


def _conv_forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return self._conv_forward(x, self.weight.to(x.dtype), bias)


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Move every Linear / Conv2d weight of ``model`` (frozen) to fp8 storage, everything else to
    ``compute_dtype``; returns how many weights are stored in fp8."""
    layers = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            layers.append((module, _linear_forward))
        elif isinstance(module, torch.nn.Conv2d):
            layers.append((module, _conv_forward))
    # rounded once, straight from the loaded dtype (not through the compute dtype first)
    stored = [module.weight.data.to(FP8) for module, _ in layers]
    model.to(compute_dtype)
    for (module, forward), weight in zip(layers, stored):
        module.weight.requires_grad_(False)
        module.weight.data = weight
        module.forward = types.MethodType(forward, module)
    return len(layers)
