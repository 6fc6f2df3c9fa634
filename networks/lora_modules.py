"""One LoRA module (LierLa / C3Lier) attached to a Linear or Conv2d: spec file-formats §a.2.

The module adds ``up(down(x)) · multiplier · scale`` to the original layer's output through a forward
hook, so the original module keeps its own ``forward`` and detaching is one ``handle.remove()``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .lora_regional import RegionState, regional_output


def compose_delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` as a weight of the original layer's layout: (out,in) or (out,in,k,k). spec §a.2 merge."""
    dtype = torch.promote_types(up.dtype, torch.float32)  # fp16/bf16 factors are composed in fp32
    up, down = up.to(dtype), down.to(dtype)
    if down.ndim == 2 and up.ndim == 2:
        return up @ down
    if down.ndim == 4 and down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    # k x k conv followed by 1x1 conv is one k x k conv with kernel up·down at every tap
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


def fit_to_shape(delta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Squeeze/unsqueeze a 1x1 delta to the target layout (SD2 proj_in/out may be 4-D or 2-D, pitfall 7)."""
    if delta.ndim == 4 and len(shape) == 2:
        return delta.flatten(1)
    if delta.ndim == 2 and len(shape) == 4:
        return delta[:, :, None, None]
    return delta


class LayerAdapter(nn.Module):
    """What every adapter of one layer shares: the layer (kept out of the state dict) and its forward hook.

    Subclasses set ``org_module_ref = (layer,)`` and ``_hook_handle = None`` and define ``_hook``."""

    org_module_ref: tuple[nn.Module]

    @property
    def org_module(self) -> nn.Module:
        return self.org_module_ref[0]

    def apply_to(self) -> None:
        """Start changing the original layer's output (the layer's own ``forward`` is untouched)."""
        if self._hook_handle is None:
            self._hook_handle = self.org_module.register_forward_hook(self._hook)

    def remove(self) -> None:
        """Detach from the original layer."""
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LoRAModule(LayerAdapter):
    """Low-rank adapter for one layer; state dict ``alpha``, ``lora_down.weight``, ``lora_up.weight``."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        # creatable on the meta device, so module counts of real-size models need no real memory
        device = org_module.weight.device if org_module.weight.device.type == "meta" else None
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                       org_module.stride, org_module.padding, bias=False, device=device)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, 1, 1, bias=False, device=device)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False, device=device)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False, device=device)
        alpha = float(alpha) if alpha is not None else 0.0
        alpha = float(self.lora_dim) if alpha == 0 else alpha  # spec §a.2: None or 0 -> alpha = rank
        self.scale = alpha / self.lora_dim
        # registered after the layers, yet state_dict lists a module's own buffers before its children
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True  # False once pre_calculation merged the weights (generation)
        self.region: RegionState | None = None  # regional LoRA (generation), shared by the network's modules
        # a tuple keeps the original layer out of this module's children and state dict
        self.org_module_ref: tuple[nn.Module] = (org_module,)
        self._hook_handle = None

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        if self.region is not None and self.region.active:
            return regional_output(self, inputs[0], output)
        delta = self.lora_delta(inputs[0])
        if delta is None:
            return output
        return output + delta.to(output.dtype)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """``up(down(x)) · m · scale`` with the training-only dropouts of spec §a.2; None = module dropped."""
        down = self.down_path(x)
        if down is None:
            return None
        lx, scale = down
        return self.lora_up(lx) * (self.multiplier * scale)

    def down_path(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """``down(x)`` after neuron and rank dropout, and the scale to use with it; None = module dropped."""
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return None
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.ndim == 3:
                mask = mask.unsqueeze(1)  # (B, tokens, r): one mask per sample, shared by all tokens
            elif lx.ndim == 4:
                mask = mask[:, :, None, None]  # (B, r, H, W)
            lx = lx * mask.to(lx.dtype)
            # behave as if the rank shrank by p (sd-scripts uses p, not the drawn mask's mean)
            scale = scale / (1.0 - self.rank_dropout)
        return lx, scale

    # --- what trains ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (variants freeze some)."""
        return list(self.parameters())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as saved: the tensors the max-norm constraint measures."""
        return self.lora_up.weight, self.lora_down.weight

    @torch.no_grad()
    def scale_factors(self, ratio: torch.Tensor) -> None:
        """Scale ``up·down`` by ``ratio`` (max-norm): sqrt(ratio) on each factor, as sd-scripts does."""
        self.lora_up.weight.mul_(ratio.sqrt().to(self.lora_up.weight))
        self.lora_down.weight.mul_(ratio.sqrt().to(self.lora_down.weight))

    # --- weights -----------------------------------------------------------------------------
    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The delta ``m · scale · up·down`` in the original layer's weight layout (fp32)."""
        m = self.multiplier if multiplier is None else multiplier
        delta = compose_delta(self.lora_up.weight, self.lora_down.weight) * (m * self.scale)
        return fit_to_shape(delta, self.org_module.weight.shape)

    def target_layers(self) -> list[nn.Module]:
        """Every original layer this module changes (one here; a fused FLUX module spans several)."""
        return [self.org_module]

    def layer_deltas(self, multiplier: float | None = None) -> list[tuple[nn.Module, torch.Tensor]]:
        """(layer, delta in that layer's weight layout) for each layer of :meth:`target_layers`."""
        return [(self.org_module, self.get_weight(multiplier))]

    def merge_to(self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None, device) -> None:
        """Add ``m · scale · up·down`` from ``sd`` (this module's tensors) into the original weight."""
        org = self.org_module
        weight = org.weight.data.to(device=device, dtype=torch.float)
        up = sd["lora_up.weight"].to(device=device, dtype=torch.float)
        down = sd["lora_down.weight"].to(device=device, dtype=torch.float)
        delta = fit_to_shape(compose_delta(up, down), weight.shape) * (self.multiplier * self.scale)
        with torch.no_grad():
            org.weight.data = (weight + delta).to(dtype or org.weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # SD2 proj_in/out LoRAs exist as 2-D and as 4-D 1x1 tensors (pitfall 7): accept either layout
        for layer in ("lora_down", "lora_up"):
            key, own = f"{prefix}{layer}.weight", getattr(self, layer).weight
            value = state_dict.get(key)
            if value is not None and value.ndim != own.ndim and value.numel() == own.numel():
                state_dict[key] = value.reshape(own.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # keep ``scale`` in step with a loaded alpha (sd-scripts keeps the creation-time scale)
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and alpha.device.type != "meta":
            value = float(alpha)
            self.scale = (value if value != 0 else self.lora_dim) / self.lora_dim
