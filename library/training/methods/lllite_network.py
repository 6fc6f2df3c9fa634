"""The trainable ControlNet-LLLite network of sdxl_train_control_net_lllite.py (sd-scripts v0.8.7's
``networks/control_net_lllite_for_train.py``, as forward pre-hooks on diffusers' SDXL U-Net).

One module per targeted U-Net Linear layer (upstream's defaults: ``to_q/to_k/to_v`` of ``attn1`` and ``to_q`` of
``attn2`` in every transformer block of the input blocks and the middle block), named
``lllite_unet_<LDM path with _>`` as gen_img's loader (``library/sampling/controlnet_lllite.py``) finds them. A
module holds

* ``conditioning1``: convs with kernel = stride, no padding, ReLU between, from the RGB hint (image size) to a
  ``cond_emb_dim`` map at its block's token grid: 4 then 2 (depth 1, grid /8), 4 then 4 (depth 2, /16), 4, 4
  then 2 (depth 3, /32); the first convs have ``cond_emb_dim // 2`` channels;
* ``down.0`` Linear(in, dim) + ReLU, ``mid.0`` Linear(dim + cond_emb_dim, dim) + ReLU on
  ``cat([cond_emb, down(x)])``, ``up.0`` Linear(dim, in) initialised to zero (the model starts unchanged).

The layer then computes ``org(x + up(dropout(mid(...))))``; the attribute names make the state dict's keys the
file's keys (``<name>.conditioning1.0.weight``, ``<name>.down.0.bias``, ...). The network has gen_img's LLLite
interface (``option``, ``embed``, ``cond``), so sample images during training use it as a loaded LLLite.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.sampling.controlnet_lllite import LLLiteOption, lllite_targets

logger = logging.getLogger(__name__)

# token-grid downscale of a block -> (kernel = stride, wide output) of each hint conv (upstream's depth 1, 2, 3)
HINT_CONVS = {8: ((4, False), (2, True)), 16: ((4, False), (4, True)), 32: ((4, False), (4, False), (2, True))}


class LLLiteModule(nn.Module):
    """One targeted layer's conditioning embedding and its down / mid / up MLP."""

    def __init__(self, in_dim: int, cond_emb_dim: int, mlp_dim: int, factor: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for kernel, wide in HINT_CONVS[factor]:
            out = cond_emb_dim if wide else cond_emb_dim // 2
            layers += [nn.Conv2d(channels, out, kernel_size=kernel, stride=kernel, padding=0), nn.ReLU(inplace=True)]
            channels = out
        self.conditioning1 = nn.Sequential(*layers[:-1])  # no ReLU after the last conv
        self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU(inplace=True))
        self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), nn.ReLU(inplace=True))
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim))
        nn.init.zeros_(self.up[0].weight)  # "zero conv": no change until trained

    def embed(self, hint: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) hint in [-1, 1] -> (B, tokens, cond_emb_dim)."""
        return self.conditioning1(hint).flatten(2).transpose(1, 2)

    def delta(self, x: torch.Tensor, cond: torch.Tensor, dropout: Optional[float]) -> torch.Tensor:
        h = self.mid(torch.cat([cond, self.down(x)], dim=2))
        if dropout and self.training:
            h = F.dropout(h, p=dropout)
        return self.up(h)


class LLLiteNetwork(nn.Module):
    """Every LLLite module of one SDXL U-Net, hooked into its Linear layers (inactive while ``cond`` is None)."""

    def __init__(self, unet: nn.Module, cond_emb_dim: int, mlp_dim: int, dropout: Optional[float] = None,
                 multiplier: float = 1.0):
        super().__init__()
        if cond_emb_dim % 2:
            raise UserError(f"--cond_emb_dim must be even (the first hint convs have half of it), got {cond_emb_dim}")
        self.option = LLLiteOption("(training)", multiplier=multiplier)
        self.dropout = dropout
        self.names: list[str] = []
        self.cond: Optional[dict[str, torch.Tensor]] = None
        self._handles = []
        for name, (linear, factor) in lllite_targets(unet).items():
            if factor not in HINT_CONVS:
                raise UserError(f"ControlNet-LLLite: U-Net layer {name} works at 1/{factor} of the image size; "
                                "LLLite supports 1/8, 1/16 and 1/32 (SDXL's three levels)")
            self.add_module(name, LLLiteModule(linear.in_features, cond_emb_dim, mlp_dim, factor))
            self.names.append(name)
            self._handles.append(linear.register_forward_pre_hook(self._hook(name)))
        if not self.names:
            raise UserError("ControlNet-LLLite: no attention layers found in the U-Net (not an SDXL U-Net?)")
        logger.info("ControlNet-LLLite: %d modules, cond_emb_dim %d, dim %d", len(self.names), cond_emb_dim, mlp_dim)

    def _hook(self, name: str):
        module = getattr(self, name)

        def hook(_linear, inputs):
            if self.cond is None or self.option.multiplier == 0.0:
                return None
            x = inputs[0]
            delta = module.delta(x.to(self.dtype), self.cond[name], self.dropout) * self.option.multiplier
            return (x + delta.to(x.dtype),) + tuple(inputs[1:])

        return hook

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def embed(self, hint: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each module's conditioning embedding of ``hint`` (B, 3, H, W) in [-1, 1]."""
        hint = hint.to(self.dtype)
        return {n: getattr(self, n).embed(hint) for n in self.names}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def dims_of(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(cond_emb_dim, network_dim) of an LLLite state dict (from any module's mid layer)."""
    mid = next((v for k, v in sd.items() if k.endswith(".mid.0.weight")), None)
    if mid is None:
        raise ValueError("no <module>.mid.0.weight tensor")
    dim = mid.shape[0]
    return mid.shape[1] - dim, dim


def load_lllite_weights(network: LLLiteNetwork, sd: dict[str, torch.Tensor], path: str) -> None:
    """Put a saved LLLite's tensors into ``network``: every module of the file must exist here and fit."""
    own = network.state_dict()
    unknown = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    if unknown or missing:
        which = f"{unknown[0]} is not in this U-Net's LLLite" if unknown else f"{missing[0]} is missing"
        raise UserError(f"--network_weights {path}: {which} ({len(unknown)} unknown, {len(missing)} missing tensors)")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f"--network_weights {path}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, this network "
                        f"{tuple(own[bad[0]].shape)} (--cond_emb_dim / --network_dim differ from the file's)")
    network.load_state_dict(sd)
