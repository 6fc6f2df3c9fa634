"""OFT (orthogonal fine-tuning, Qiu et al. 2023) as a ``--network_module`` plug-in: sd-scripts' ``networks.oft``.

Each adapted U-Net layer keeps its weight and has its output channels rotated by a block-diagonal orthogonal
matrix ``R``: ``y' = y · R``. Per block ``R_b = (I + Q)(I - Q)^-1`` (Cayley transform) of the skew-symmetric
``Q = B - Bᵀ`` of the trained block ``B``; ``Q`` of all blocks together is scaled down to Frobenius norm at most
``alpha · out_features`` (the constraint), and a multiplier ``m`` blends ``m·R_b + (1 - m)·I``.
``--network_dim`` is the number of blocks (it must divide every adapted layer's output width), ``--network_alpha``
the constraint factor. File: ``oft_unet_<path>.oft_blocks`` (blocks, size, size) and ``.alpha`` per layer, with
upstream's layer names (Diffusers paths for SD1/SD2, LDM paths for SDXL).

``--network_args``: ``enable_all_linear=true`` (every Linear/1x1 conv of the transformer blocks instead of the
attention projections only), ``enable_conv=true`` (also ResNet and resampler layers). Where this differs from
sd-scripts v0.8.7, on purpose (docs/compatibility.md): the two flags are read as booleans (upstream takes any
non-empty string, "false" included, as true); merging rotates the bias as the forward pass does (upstream's merge
leaves it, so merged and unmerged outputs differ); files with conv layers load for generation (upstream infers
``enable_conv`` from 4-D tensors, which OFT files never have); the rotation is applied block by block (upstream
builds the full ``out × out`` matrix: same result, ``blocks`` times the arithmetic).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import UserError
from library.formats.lora_io import load_state_dict_file, save_network_weights

from .lora_modules import LayerAdapter
from .lora_targets import Target, unet_layers

logger = logging.getLogger(__name__)

PREFIX_UNET = "oft_unet"
ATTENTION_TARGETS = ("Attention", "CrossAttention")  # diffusers / sd-scripts' own attention class
ALL_LINEAR_TARGETS = ("Transformer2DModel",)
CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
NETWORK_ARGS = ("enable_all_linear", "enable_conv")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "none", "")


def _flag(kwargs: Mapping[str, Any], key: str) -> bool:
    value = kwargs.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UserError(f"--network_args {key}={value!r}: expected true or false")


def out_features(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def cayley_blocks(blocks: torch.Tensor, constraint: float, multiplier: float) -> torch.Tensor:
    """The rotation blocks ``m·(I + Q)(I - Q)^-1 + (1 - m)·I`` of trained blocks (n, b, b), in float32."""
    blocks = blocks.float()
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[1], device=blocks.device).expand_as(q)
    rotation = torch.matmul(eye + q, torch.linalg.inv(eye - q))
    return multiplier * rotation + (1 - multiplier) * eye


def rotate_channels(y: torch.Tensor, rotation: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``y · blockdiag(rotation)`` along ``channel_dim`` (per block: (..., b) @ (b, b))."""
    n, b, _ = rotation.shape
    moved = y.movedim(channel_dim, -1)
    out = torch.einsum("...ni,nij->...nj", moved.reshape(*moved.shape[:-1], n, b), rotation.to(y.dtype))
    return out.reshape(moved.shape).movedim(-1, channel_dim)


class OFTModule(LayerAdapter):
    """Trained blocks for one layer; state dict ``oft_blocks`` then ``alpha`` (upstream's order)."""

    def __init__(self, oft_name: str, org_module: nn.Module, multiplier: float = 1.0, dim: int = 4,
                 alpha: float = 1.0):
        super().__init__()
        self.oft_name = self.lora_name = oft_name
        out_dim = out_features(org_module)
        if dim <= 0 or out_dim % dim:
            raise UserError(f"--network_dim {dim}: OFT splits each layer's {out_dim} output channels into --network_dim "
                            f"blocks, so it must divide {out_dim} ({oft_name})")
        self.num_blocks, self.block_size, self.out_dim = dim, out_dim // dim, out_dim
        device = org_module.weight.device if org_module.weight.device.type == "meta" else None
        self.oft_blocks = nn.Parameter(torch.zeros(dim, self.block_size, self.block_size, device=device))
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        self.constraint = float(alpha) * out_dim
        self.multiplier = multiplier
        self.enabled = True
        self.org_module_ref: tuple[nn.Module] = (org_module,)  # not a child: stays out of the state dict
        self._hook_handle = None

    def rotation(self, multiplier: float | None = None) -> torch.Tensor:
        return cayley_blocks(self.oft_blocks, self.constraint, self.multiplier if multiplier is None else multiplier)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.multiplier == 0:
            return output
        return rotate_channels(output, self.rotation(), 1 if output.ndim == 4 else -1)

    @torch.no_grad()
    def merge_into_layer(self, multiplier: float | None = None, dtype: torch.dtype | None = None) -> None:
        """``W' = Rᵀ·W`` and ``b' = Rᵀ·b`` over output channels: the layer then computes ``(W x + b)·R``."""
        org = self.org_module
        r = torch.block_diag(*self.rotation(multiplier).to(org.weight.device))
        weight = org.weight.float()
        org.weight.data = torch.einsum("o...,op->p...", weight, r).to(dtype or org.weight.dtype)
        if getattr(org, "bias", None) is not None:
            org.bias.data = (org.bias.float() @ r).to(dtype or org.bias.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and alpha.device.type != "meta":
            self.constraint = float(alpha) * self.out_dim


def _targets(unet: nn.Module, all_linear: bool, conv: bool) -> list[Target]:
    classes = (ALL_LINEAR_TARGETS if all_linear else ATTENTION_TARGETS) + (CONV_TARGETS if conv else ())

    def accept(layer: nn.Module) -> bool:  # upstream: every Linear and 1x1 conv, k x k convs with enable_conv
        return not isinstance(layer, nn.Conv2d) or tuple(layer.kernel_size) == (1, 1) or conv

    return unet_layers(unet, classes, PREFIX_UNET, accept)


def target_widths(unet: nn.Module) -> dict[str, int]:
    """``{OFT module name: output width}`` of every layer an OFT file may name (all linear and conv layers)."""
    return {t.lora_name: out_features(t.module) for t in _targets(unet, True, True)}


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs: str) -> "OFTNetwork":
    """A new OFT network: ``--network_dim`` blocks, ``--network_alpha`` constraint, flags in ``--network_args``."""
    unknown = sorted(k for k, v in kwargs.items() if k not in NETWORK_ARGS and not (k == "dropout" and v is None))
    if unknown:
        raise UserError(f"--network_args {unknown[0]}: not an option of networks.oft (it takes "
                        f"{', '.join(NETWORK_ARGS)})")
    if neuron_dropout is not None:
        raise UserError("--network_dropout: networks.oft has no dropout")
    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    return OFTNetwork(unet, multiplier, dim, alpha, _flag(kwargs, "enable_all_linear"), _flag(kwargs, "enable_conv"))


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: str) -> tuple["OFTNetwork", Mapping[str, torch.Tensor]]:
    """A network with exactly the file's layers, each with its own block count and constraint."""
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    dims = {k[: -len(".oft_blocks")]: int(v.shape[0]) for k, v in weights_sd.items() if k.endswith(".oft_blocks")}
    alphas = {k[: -len(".alpha")]: float(v.float()) for k, v in weights_sd.items() if k.endswith(".alpha")}
    if not dims:
        raise UserError(f"--network_weights {file}: no oft_unet_*.oft_blocks tensors: not an OFT file")
    network = OFTNetwork(unet, multiplier, modules_dim=dims, modules_alpha=alphas)
    return network, weights_sd


class OFTNetwork(nn.Module):
    """All OFT modules of a U-Net (OFT adapts no text encoder, as upstream)."""

    def __init__(self, unet: nn.Module, multiplier: float = 1.0, dim: int = 4, alpha: float = 1.0,
                 enable_all_linear: bool = False, enable_conv: bool = False,
                 modules_dim: Mapping[str, int] | None = None, modules_alpha: Mapping[str, float] | None = None):
        super().__init__()
        self.multiplier, self.dim, self.alpha = multiplier, dim, alpha
        from_file = modules_dim is not None
        targets = _targets(unet, enable_all_linear or from_file, enable_conv or from_file)
        if from_file:
            targets = [t for t in targets if t.lora_name in modules_dim]
        self.unet_ofts: list[OFTModule] = []
        for target in targets:
            d = modules_dim[target.lora_name] if from_file else dim
            a = (modules_alpha or {}).get(target.lora_name, alpha) if from_file else alpha
            self.unet_ofts.append(OFTModule(target.lora_name, target.module, multiplier, d, a))
        self.text_encoder_loras: list = []  # tells the loop there is nothing to train in the text encoder
        for oft in self.unet_ofts:
            self.add_module(oft.oft_name, oft)
        logger.info("OFT: %d U-Net modules, %s blocks, constraint %s%s%s", len(self.unet_ofts), dim, alpha,
                    ", all linear layers" if enable_all_linear else "", ", conv layers" if enable_conv else "")

    # --- plug-in interface (spec file-formats §a.3) ----------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for oft in self.unet_ofts:
            oft.multiplier = multiplier

    def load_weights(self, file: str) -> Any:
        info = self.load_state_dict(load_state_dict_file(file), strict=False)
        logger.info("weights loaded from %s: %s", file, info)
        return info

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        if not apply_unet:
            raise UserError("networks.oft adapts the U-Net only: --network_train_text_encoder_only leaves it "
                            "nothing to train")
        for oft in self.unet_ofts:
            oft.apply_to()

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder, unet, weights_sd: Mapping[str, torch.Tensor], dtype=None, device=None) -> None:
        self.load_state_dict(weights_sd, strict=False)
        for oft in self.unet_ofts:
            oft.merge_into_layer(dtype=dtype)
        logger.info("OFT weights merged: %d modules", len(self.unet_ofts))

    def prepare_optimizer_params(self, text_encoder_lr: float | None, unet_lr: float | None,
                                 default_lr: float | None = None) -> list[dict]:
        self.requires_grad_(True)
        group: dict = {"params": list(self.parameters())}
        if unet_lr is not None:
            group["lr"] = unet_lr
        return [group]

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the rotation holds no activations worth checkpointing."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def get_trainable_params(self):
        return list(self.parameters())

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        save_network_weights(self, file, dtype, metadata)

    # --- generation helpers -------------------------------------------------------------------
    def set_region(self, sub_prompt_index: int, is_last_network: bool, mask: torch.Tensor | None) -> None:
        if mask is not None and not bool((mask >= 1).all()):
            raise UserError("regional prompts: networks.oft cannot be restricted to a region")

    def set_current_generation(self, batch_size: int, num_sub_prompts: int, width: int, height: int,
                               shared: Any = None) -> None:
        """Nothing to prepare."""

    def backup_weights(self) -> None:
        for oft in self.unet_ofts:
            org = oft.org_module
            if not hasattr(org, "_lora_org_weight"):
                org._lora_org_weight = org.weight.detach().clone()
                org._lora_org_bias = None if org.bias is None else org.bias.detach().clone()
                org._lora_restored = True

    def restore_weights(self) -> None:
        for oft in self.unet_ofts:
            org = oft.org_module
            if hasattr(org, "_lora_org_weight") and not org._lora_restored:
                with torch.no_grad():
                    org.weight.copy_(org._lora_org_weight)
                    if org._lora_org_bias is not None:
                        org.bias.copy_(org._lora_org_bias)
                org._lora_restored = True
            oft.enabled = True

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """Merge each rotation into its layer and switch the module off (faster generation)."""
        for oft in self.unet_ofts:
            oft.merge_into_layer()
            oft.org_module._lora_restored = False
            oft.enabled = False


__all__ = ["create_network", "create_network_from_weights", "OFTNetwork", "OFTModule", "cayley_blocks"]
