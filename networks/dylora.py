"""DyLoRA (Valipour et al. 2023) as a ``--network_module`` plug-in: sd-scripts' ``networks.dylora``.

One file trains every rank from ``unit`` to ``--network_dim`` at once: at each forward pass a module draws a rank
``b`` (a multiple of ``unit`` below the dim) and only units ``[b, b + unit)`` of its factors get a gradient; the
output adds ``up·down·x · scale · sqrt(dim / (b + unit))`` with all units, as upstream computes it. Each unit
is its own parameter, so the optimizer skips the units that got no gradient (no momentum, no weight decay),
as upstream's per-rank parameters do. The file is a plain LoRA (``lora_down`` / ``lora_up`` / ``alpha``);
``networks/extract_lora_from_dylora.py`` cuts LoRAs of rank ``unit, 2·unit, …`` out of it.

``--network_args``: ``unit`` (default 1; must divide ``--network_dim``), ``conv_dim`` (must equal
``--network_dim``: DyLoRA has one rank) and ``conv_alpha``. Differences from sd-scripts v0.8.7, on purpose
(docs/compatibility.md): outside training the module is a plain LoRA (upstream draws a random rank at every
generation step too); ``conv_alpha`` is used for the conv layers (upstream reads and ignores it); with gradient
checkpointing the recomputation reuses the rank of its forward pass (upstream draws a new one); dropouts are
refused (upstream ignores them).
"""
from __future__ import annotations

import functools
import math
import random
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.formats.lora_io import load_state_dict_file

from . import lora
from .lora_modules import LoRAModule, compose_delta, fit_to_shape

NETWORK_ARGS = ("unit", "conv_dim", "conv_alpha")


class DyLoRAModule(LoRAModule):
    """A LoRA module whose rank units are separate parameters (``lora_A.i`` rows, ``lora_B.i`` columns)."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, unit: int = 1):
        nn.Module.__init__(self)  # LoRAModule's layers are replaced by per-unit parameters
        if dropout is not None or rank_dropout is not None or module_dropout is not None:
            raise UserError("--network_dropout / rank_dropout / module_dropout: networks.dylora has no dropout")
        self.lora_name, self.lora_dim, self.unit = lora_name, int(lora_dim), int(unit)
        if self.unit <= 0 or self.lora_dim % self.unit:
            raise UserError(f"--network_args unit={unit}: must divide the rank {lora_dim} ({lora_name})")
        alpha = float(alpha) if alpha is not None else 0.0
        alpha = float(self.lora_dim) if alpha == 0 else alpha
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.kernel = tuple(org_module.kernel_size) if self.is_conv else ()
        in_dim = org_module.in_channels if self.is_conv else org_module.in_features
        out_dim = org_module.out_channels if self.is_conv else org_module.out_features
        k = self.kernel if self.kernel != (1, 1) else ()  # 1x1 convs keep 2-D units, as upstream
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(1, in_dim, *k)) for _ in range(self.lora_dim)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(out_dim, 1, *(1,) * len(k)))
                                        for _ in range(self.lora_dim)])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # per unit, as upstream (fan-in of one row)
        self.multiplier = multiplier
        self.dropout = self.rank_dropout = self.module_dropout = None
        self.enabled = True
        self.region: torch.Tensor | None = None
        self.org_module_ref: tuple[nn.Module] = (org_module,)
        self._hook_handle = None
        self._last_rank: int | None = None

    # --- the factors in the saved layout --------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        down, up = torch.cat(tuple(self.lora_A), 0), torch.cat(tuple(self.lora_B), 1)
        if self.is_conv and self.kernel == (1, 1):
            down, up = down[:, :, None, None], up[:, :, None, None]
        return up, down

    @torch.no_grad()
    def scale_factors(self, ratio: torch.Tensor) -> None:
        for p in list(self.lora_A) + list(self.lora_B):
            p.mul_(ratio.sqrt().to(p))

    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        m = self.multiplier if multiplier is None else multiplier
        up, down = self.factors()
        return fit_to_shape(compose_delta(up, down) * (m * self.scale), self.org_module.weight.shape)

    # --- forward --------------------------------------------------------------------------------
    def _draw_rank(self) -> int:
        if torch._C._current_graph_task_id() != -1 and self._last_rank is not None:
            return self._last_rank  # gradient checkpointing recomputes inside backward: same units as before
        rank = random.randint(0, self.lora_dim - 1)
        self._last_rank = rank - rank % self.unit
        return self._last_rank

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.multiplier * self.scale
        if self.training:
            rank = self._draw_rank()
            for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
                trains = rank <= i < rank + self.unit
                a.requires_grad_(trains)
                b.requires_grad_(trains)
            factor = factor * math.sqrt(self.lora_dim / (rank + self.unit))
        up, down = self.factors()
        x = x.to(down.dtype)
        if self.is_conv:
            org = self.org_module
            return F.conv2d(F.conv2d(x, down, stride=org.stride, padding=org.padding), up) * factor
        return F.linear(F.linear(x, down), up) * factor

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_A) + list(self.lora_B)

    def requires_grad_(self, requires_grad: bool = True) -> "DyLoRAModule":
        for p in self.trainable_parameters():
            p.requires_grad_(requires_grad)
        return self

    # --- state dict: a plain LoRA -----------------------------------------------------------------
    def state_dict(self, *args: Any, destination=None, prefix: str = "", keep_vars: bool = False):
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for i in range(self.lora_dim):
            sd.pop(f"{prefix}lora_A.{i}", None)
            sd.pop(f"{prefix}lora_B.{i}", None)
        up, down = self.factors()
        sd[f"{prefix}lora_down.weight"] = down if keep_vars else down.detach()
        sd[f"{prefix}lora_up.weight"] = up if keep_vars else up.detach()
        return sd

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        down = state_dict.pop(prefix + "lora_down.weight", None)
        up = state_dict.pop(prefix + "lora_up.weight", None)
        if down is not None and up is not None:
            if self.is_conv and self.kernel == (1, 1):
                down, up = down.flatten(1), up.flatten(1)
            for i in range(self.lora_dim):  # the children (ParameterLists) load these next
                state_dict[f"{prefix}lora_A.{i}"] = down[i:i + 1]
                state_dict[f"{prefix}lora_B.{i}"] = up[:, i:i + 1]
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and alpha.device.type != "meta":
            value = float(alpha)
            self.scale = (value if value != 0 else self.lora_dim) / self.lora_dim


class DyLoRANetwork(lora.LoRANetwork):
    """LoRANetwork with DyLoRA modules; targets and names are LoRA's."""

    def __init__(self, *args: Any, unit: int = 1, **kwargs: Any):
        self.module_class = functools.partial(DyLoRAModule, unit=unit)
        super().__init__(*args, **kwargs)
        self.unit = unit


def _check_args(kwargs: Mapping[str, Any]) -> None:
    unknown = sorted(k for k, v in kwargs.items() if k not in NETWORK_ARGS and not (k == "dropout" and v is None))
    if unknown:
        raise UserError(f"--network_args {unknown[0]}: not an option of networks.dylora (it takes "
                        f"{', '.join(NETWORK_ARGS)})")


def _int_arg(kwargs: Mapping[str, Any], key: str, default: int) -> int:
    value = kwargs.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--network_args {key}={value!r}: expected a whole number") from None


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs: str) -> DyLoRANetwork:
    """A new DyLoRA network; ``conv_dim`` (if given) must equal ``--network_dim``."""
    _check_args(kwargs)
    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = kwargs.get("conv_dim")
    conv_alpha = None
    if conv_dim is not None:
        if _int_arg(kwargs, "conv_dim", dim) != dim:
            raise UserError(f"--network_args conv_dim={conv_dim}: DyLoRA has one rank, so it must equal "
                            f"--network_dim {dim}")
        conv_alpha = float(kwargs["conv_alpha"]) if kwargs.get("conv_alpha") is not None else alpha
    elif kwargs.get("conv_alpha") is not None:
        raise UserError("--network_args conv_alpha: needs conv_dim (DyLoRA adapts conv layers only with it)")
    return DyLoRANetwork(text_encoder, unet, multiplier=multiplier, lora_dim=dim, alpha=alpha, dropout=neuron_dropout,
                         conv_lora_dim=dim if conv_dim is not None else None, conv_alpha=conv_alpha,
                         unit=_int_arg(kwargs, "unit", 1))


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: str) -> tuple[DyLoRANetwork, Mapping[str, torch.Tensor]]:
    _check_args(kwargs)
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    dims, alphas = lora.dims_from_weights(weights_sd)
    network = DyLoRANetwork(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
                            unit=_int_arg(kwargs, "unit", 1))
    return network, weights_sd


__all__ = ["create_network", "create_network_from_weights", "DyLoRANetwork", "DyLoRAModule"]
