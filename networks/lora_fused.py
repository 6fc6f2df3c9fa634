"""One LoRA module over several Linear layers that a fused layer of another layout splits into.

FLUX.1 LoRA files name BFL's fused layers: a double block's ``img_attn.qkv`` is diffusers' ``to_q`` | ``to_k``
| ``to_v``, a single block's ``linear1`` is ``to_q`` | ``to_k`` | ``to_v`` | ``proj_mlp`` (rows stacked in that
order, all reading the same input). A LoRA on the fused layer has one ``lora_down`` (rank, in) and one
``lora_up`` (sum of the parts' rows, rank); on the split layers it is the same function when every part
shares ``down(x)`` and takes its own rows of ``up``. The file keeps the fused tensors, so it is exactly what
sd-scripts writes and reads.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora_modules import LoRAModule, compose_delta


@dataclass(frozen=True)
class FusedLayer:
    """What the fused layer would be: its widths, and a weight only to say on which device it lives."""

    in_features: int
    out_features: int
    weight: torch.Tensor


def fused_layer(layers: list[nn.Linear]) -> FusedLayer:
    """The fused Linear that stacks ``layers``' rows; they must read inputs of one width."""
    widths = {layer.in_features for layer in layers}
    if len(widths) != 1:
        raise ValueError(f"fused layers read inputs of different widths: {sorted(widths)}")
    return FusedLayer(widths.pop(), sum(layer.out_features for layer in layers), layers[0].weight)


def split_rows(fused: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """A fused (rows, ...) tensor cut into each layer's rows, in order."""
    return list(torch.split(fused, [layer.out_features for layer in layers], dim=0))


class FusedLoRAModule(LoRAModule):
    """LoRA of one fused layer applied to the layers it splits into; state dict as for :class:`LoRAModule`.

    ``down(x)`` (with its dropouts) is computed once per input and shared by every part, so training behaves
    as a LoRA on the fused layer does: one neuron / rank dropout mask, one module-dropout draw."""

    def __init__(self, lora_name: str, org_modules: list[nn.Linear], multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__(lora_name, fused_layer(org_modules), multiplier, lora_dim, alpha, dropout, rank_dropout,
                         module_dropout)
        self.org_module_ref = tuple(org_modules)
        self._rows = [0]
        for layer in org_modules:
            self._rows.append(self._rows[-1] + layer.out_features)
        self._handles: list = []
        # the input the parts share, its down path and which parts still have to use it
        self._shared: tuple[torch.Tensor, tuple[torch.Tensor, float] | None, set[int]] | None = None

    def target_layers(self) -> list[nn.Module]:
        return list(self.org_module_ref)

    def apply_to(self) -> None:
        if not self._handles:
            self._handles = [layer.register_forward_hook(functools.partial(self._part_hook, i))
                             for i, layer in enumerate(self.org_module_ref)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._shared = None

    def _shared_down(self, part: int, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """``down_path(x)``, computed by the first part that sees ``x`` and kept until every part used it."""
        if self._shared is None or self._shared[0] is not x or part not in self._shared[2]:
            self._shared = (x, self.down_path(x), set(range(len(self.org_module_ref))))
        x_ref, down, pending = self._shared
        pending.discard(part)
        if not pending:
            self._shared = None  # drop the reference to the activation as soon as all parts are done
        return down

    def _part_hook(self, part: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        down = self._shared_down(part, inputs[0])
        if down is None:
            return output
        lx, scale = down
        up = self.lora_up.weight[self._rows[part]: self._rows[part + 1]]
        return output + (F.linear(lx, up) * (self.multiplier * scale)).to(output.dtype)

    # --- weights -----------------------------------------------------------------------------
    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The fused delta ``m · scale · up·down`` (sum of rows, in), fp32."""
        m = self.multiplier if multiplier is None else multiplier
        return compose_delta(self.lora_up.weight, self.lora_down.weight) * (m * self.scale)

    def layer_deltas(self, multiplier: float | None = None) -> list[tuple[nn.Module, torch.Tensor]]:
        layers = self.target_layers()
        return list(zip(layers, split_rows(self.get_weight(multiplier), layers)))

    def merge_to(self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None, device) -> None:
        """Add each part's rows of ``m · scale · up·down`` from ``sd`` into its layer's weight."""
        up = sd["lora_up.weight"].to(device=device, dtype=torch.float)
        down = sd["lora_down.weight"].to(device=device, dtype=torch.float)
        layers = self.target_layers()
        deltas = split_rows(compose_delta(up, down) * (self.multiplier * self.scale), layers)
        with torch.no_grad():
            for layer, delta in zip(layers, deltas):
                weight = layer.weight.data.to(device=device, dtype=torch.float)
                layer.weight.data = (weight + delta).to(dtype or layer.weight.dtype)
