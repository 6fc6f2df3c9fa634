"""kohya LoRA network (LoRA-LierLa / LoRA-C3Lier) as a ``--network_module`` plug-in.

Public functions and methods are exactly the plug-in interface of spec file-formats §a.3; key names,
tensors and file layout follow §a.1-a.2. Block-wise options: spec cli-options §12; max-norm: §13.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from library.errors import UserError
from library.formats.lora_io import load_state_dict_file, save_network_weights

from .lora_blocks import BlockDims, BlockLRWeights, parse_block_dims, parse_block_lr_weights
from .lora_modules import LoRAModule, compose_delta
from .lora_regional import RegionState, region_mask
from .lora_targets import PREFIX_TE, PREFIX_UNET, Target, block_index, te_prefixes, text_encoder_targets, unet_targets

logger = logging.getLogger(__name__)


def _opt_float(kwargs: Mapping[str, Any], key: str) -> float | None:
    value = kwargs.get(key)
    if value is None or value == "None":
        return None
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--network_args {key}={value!r}: expected a number") from None


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, *, network_class: type | None = None,
                   **kwargs: str) -> "LoRANetwork":
    """A new LoRA network from ``--network_dim/alpha/dropout`` and string ``--network_args`` (spec cli §12).

    ``network_class``: a variant with the same options and file layout (``networks.lora_fa``)."""
    network_class = _network_class(network_class)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = _opt_float(kwargs, "conv_dim")
    conv_dim = int(conv_dim) if conv_dim is not None else None
    conv_alpha = None
    if conv_dim is not None:
        conv_alpha = _opt_float(kwargs, "conv_alpha")
        conv_alpha = 1.0 if conv_alpha is None else conv_alpha  # an explicit 0 stays 0 (alpha = rank)

    lr_weights = parse_block_lr_weights(kwargs)
    block_dims = None
    if kwargs.get("block_dims") is not None or lr_weights is not None:
        block_dims = parse_block_dims(kwargs, network_dim, network_alpha, conv_dim, conv_alpha, lr_weights)

    network = network_class(text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
                            dropout=neuron_dropout, rank_dropout=_opt_float(kwargs, "rank_dropout"),
                            module_dropout=_opt_float(kwargs, "module_dropout"), conv_lora_dim=conv_dim,
                            conv_alpha=conv_alpha, block_dims=block_dims)
    if lr_weights is not None:
        network.set_block_lr_weight(lr_weights)
    return network


def _network_class(network_class: Any) -> type:
    if network_class is None:
        return LoRANetwork
    if not (isinstance(network_class, type) and issubclass(network_class, LoRANetwork)):
        raise UserError(f"--network_args network_class={network_class!r}: not an option of this network module")
    return network_class


def dims_from_weights(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank from ``lora_down`` and alpha (missing -> rank) from a LoRA state dict (spec §a.2)."""
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "alpha":
            alphas[name] = float(value.float())  # may be saved as fp16 (pitfall 5)
        elif rest == "lora_down.weight":
            dims[name] = value.shape[0]
    return dims, {name: alphas.get(name, float(dim)) for name, dim in dims.items()}


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                *, network_class: type | None = None,
                                **kwargs: str) -> tuple["LoRANetwork", Mapping[str, torch.Tensor]]:
    """A network shaped like a saved file: only its modules, their ranks and alphas (spec §a.1 last row)."""
    network_class = _network_class(network_class)
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    modules_dim, modules_alpha = dims_from_weights(weights_sd)
    network = network_class(text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim,
                            modules_alpha=modules_alpha)
    lr_weights = parse_block_lr_weights(kwargs)
    if lr_weights is not None:
        network.set_block_lr_weight(lr_weights)
    return network, weights_sd


class LoRANetwork(nn.Module):
    """All LoRA modules of one model: text encoder modules first, then U-Net (spec §a.2 order).

    Variants with the same file layout (LoRA-FA, DyLoRA) swap ``module_class``; the network asks each module
    which of its parameters train, so a variant that freezes or re-arranges factors needs no other change."""

    module_class: type[LoRAModule] = LoRAModule

    def __init__(self, text_encoder, unet: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, conv_lora_dim: int | None = None,
                 conv_alpha: float | None = None, block_dims: BlockDims | None = None,
                 modules_dim: Mapping[str, int] | None = None, modules_alpha: Mapping[str, float] | None = None):
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.block_lr_weights: BlockLRWeights | None = None
        self.weights_sd: Mapping[str, torch.Tensor] | None = None
        self._dims = (block_dims, modules_dim, modules_alpha)

        self.text_encoder_loras: list[LoRAModule]
        self.unet_loras: list[LoRAModule]
        self.text_encoder_loras, self.unet_loras = self._build_modules(text_encoder, unet)
        logger.debug("LoRA modules created: text encoder %d, U-Net %d", len(self.text_encoder_loras),
                     len(self.unet_loras))
        # registered now (not in apply_to as sd-scripts does), so .to()/.parameters() work before apply_to
        for lora in self.text_encoder_loras + self.unet_loras:
            if hasattr(self, lora.lora_name):
                raise ValueError(f"duplicate LoRA module name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    def _build_modules(self, text_encoder, unet: nn.Module | None) -> tuple[list[LoRAModule], list[LoRAModule]]:
        """(text-encoder modules, U-Net modules) for the layers this network adapts (other models override)."""
        block_dims, modules_dim, _ = self._dims
        encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        encoders = [te for te in encoders if te is not None]
        te_targets = [t for prefix, te in zip(te_prefixes(len(encoders)), encoders)
                      for t in text_encoder_targets(prefix, te)]
        # conv targets are chosen per network (pitfall 4: never widen a shared list)
        with_conv = (modules_dim is not None or self.conv_lora_dim is not None
                     or (block_dims is not None and block_dims.conv_dims is not None))
        u_targets = unet_targets(unet, with_conv) if unet is not None else []
        return self._create_modules(te_targets), self._create_modules(u_targets)

    def _dim_alpha(self, target: Target) -> tuple[int | None, float | None]:
        block_dims, modules_dim, modules_alpha = self._dims
        if modules_dim is not None:  # from weights: only names present in the file
            return modules_dim.get(target.lora_name), (modules_alpha or {}).get(target.lora_name)
        if target.is_unet and block_dims is not None:
            return block_dims.dim_alpha(target.lora_name, target.is_conv_kxk)
        if target.is_conv_kxk:
            return self.conv_lora_dim, self.conv_alpha
        return self.lora_dim, self.alpha

    def _create_modules(self, targets: Iterable[Target]) -> list[LoRAModule]:
        loras = []
        for target in targets:
            dim, alpha = self._dim_alpha(target)
            if not dim:
                continue  # no rank for this layer (LierLa conv, zero-LR block, or absent from the file)
            loras.append(self.module_class(target.lora_name, target.module, self.multiplier, dim, alpha,
                                           self.dropout, self.rank_dropout, self.module_dropout))
        return loras

    # --- plug-in interface (spec §a.3) --------------------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def set_block_lr_weight(self, lr_weights: BlockLRWeights) -> None:
        self.block_lr_weights = lr_weights

    def load_weights(self, file: str) -> Any:
        """Load a LoRA file non-strictly (missing/extra keys ignored, spec §a.2); returns the key report."""
        info = self.load_state_dict(load_state_dict_file(file), strict=False)
        logger.info("weights loaded from %s: %s", file, info)
        return info

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Attach the modules; a part not applied is dropped, so it is absent from saved files."""
        dropped = ([] if apply_text_encoder else self.text_encoder_loras) + ([] if apply_unet else self.unet_loras)
        for lora in dropped:
            delattr(self, lora.lora_name)
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
        # counted after the drop: modules of a part that is not applied are neither trained nor saved
        logger.info("LoRA modules: text encoder %s, U-Net %s",
                    len(self.text_encoder_loras) if apply_text_encoder else "not trained",
                    len(self.unet_loras) if apply_unet else "not trained")
        if self.weights_sd:
            logger.info("weights loaded: %s", self.load_state_dict(self.weights_sd, strict=False))

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder, unet, weights_sd: Mapping[str, torch.Tensor], dtype=None, device=None) -> None:
        """Add every module's ``m·scale·up·down`` from ``weights_sd`` into the base weights (spec §a.2)."""
        has_te = any(k.startswith(PREFIX_TE) for k in weights_sd)
        has_unet = any(k.startswith(PREFIX_UNET) for k in weights_sd)
        loras = (self.text_encoder_loras if has_te else []) + (self.unet_loras if has_unet else [])
        per_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights_sd.items():
            name, _, rest = key.partition(".")
            per_module.setdefault(name, {})[rest] = value
        for lora in loras:
            sd = per_module.get(lora.lora_name)
            if sd and "lora_up.weight" in sd and "lora_down.weight" in sd:
                lora.merge_to(sd, dtype, device)
        logger.info("LoRA weights merged: %d modules", len(loras))

    def requires_grad_(self, requires_grad: bool = True) -> "LoRANetwork":
        """Each module decides (a LoRA-FA module keeps its down projection frozen)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.requires_grad_(requires_grad)
        return self

    def prepare_optimizer_params(self, text_encoder_lr: float | None, unet_lr: float | None,
                                 default_lr: float | None = None) -> list[dict]:
        """Param groups: TE, then U-Net (one group per block with block LR weights; LR-0 groups dropped)."""
        self.requires_grad_(True)
        groups = []
        if self.text_encoder_loras:
            group = {"params": [p for lora in self.text_encoder_loras for p in lora.trainable_parameters()]}
            if text_encoder_lr is not None:
                group["lr"] = text_encoder_lr
            groups.append(group)
        if self.unet_loras and self.block_lr_weights is None:
            group = {"params": [p for lora in self.unet_loras for p in lora.trainable_parameters()]}
            if unet_lr is not None:
                group["lr"] = unet_lr
            groups.append(group)
        elif self.unet_loras:
            groups.extend(self._block_param_groups(unet_lr, default_lr))
        return groups

    def _block_param_groups(self, unet_lr: float | None, default_lr: float | None) -> list[dict]:
        by_block: dict[int, list[LoRAModule]] = {}
        for lora in self.unet_loras:
            by_block.setdefault(block_index(lora.lora_name), []).append(lora)
        groups = []
        for loras in by_block.values():
            group = {"params": [p for lora in loras for p in lora.trainable_parameters()]}
            base = unet_lr if unet_lr is not None else default_lr
            if base is not None:
                group["lr"] = base * self.block_lr_weights.weight_of(loras[0].lora_name)
                if group["lr"] == 0:
                    continue
            groups.append(group)
        return groups

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA modules hold no activations of their own worth checkpointing."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()  # dropouts act only in training mode

    def get_trainable_params(self):
        return [p for lora in self.text_encoder_loras + self.unet_loras for p in lora.trainable_parameters()]

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the state dict (cast to ``dtype`` if given); safetensors get metadata and ``sshs_*`` hashes."""
        save_network_weights(self, file, dtype, metadata)

    # --- regularization (spec cli-options §13) ------------------------------------------------
    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """Scale up and down by sqrt(ratio) where ‖up·down·alpha/dim‖ > max; (keys_scaled, mean, max norm)."""
        keys_scaled, norms = 0, []
        for lora in self.text_encoder_loras + self.unet_loras:
            up, down = lora.factors()
            scale = lora.alpha.to(device).float() / down.shape[0]
            norm_raw = (compose_delta(up.to(device), down.to(device)) * scale).norm()
            norm = norm_raw.clamp(min=max_norm_value / 2)
            ratio = (norm.clamp(max=max_norm_value) / norm).cpu()
            if ratio != 1:
                keys_scaled += 1
                lora.scale_factors(ratio)
            norms.append(float(norm_raw.cpu() * ratio))
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # --- generation helpers (spec §a.3 last sentence) -------------------------------------------
    def set_region(self, sub_prompt_index: int, is_last_network: bool, mask: torch.Tensor | None) -> None:
        """Regional LoRA (networks/lora_regional.py): this network serves sub-prompt ``sub_prompt_index`` within
        ``mask`` (H, W in [0,1]; all zero = the whole image). None ends regional generation."""
        state = None if mask is None else RegionState(sub_prompt_index, is_last_network, region_mask(mask))
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.region = state

    def set_current_generation(self, batch_size: int, num_sub_prompts: int, width: int, height: int,
                               shared: Any = None, ds_ratio: float | None = None) -> None:
        """Per U-Net batch of regional generation: batch size, sub-prompts per image, image size (the masks are
        resized to the U-Net's activation sizes now) and the dict the networks share during the batch."""
        loras = self.text_encoder_loras + self.unet_loras
        state = loras[0].region if loras else None
        if state is None:
            return
        ref = next(loras[0].parameters())  # the modules' dtype and device (upstream: the first lora_down)
        state.set_generation(batch_size, num_sub_prompts, width, height, {} if shared is None else shared,
                             ref.dtype, ref.device, ds_ratio)

    def backup_weights(self) -> None:
        """Keep a copy of every targeted base weight, once, so ``restore_weights`` can undo merges."""
        for lora in self.text_encoder_loras + self.unet_loras:
            for org in lora.target_layers():
                if not hasattr(org, "_lora_org_weight"):
                    org._lora_org_weight = org.weight.detach().clone()
                    org._lora_restored = True

    def restore_weights(self) -> None:
        for lora in self.text_encoder_loras + self.unet_loras:
            for org in lora.target_layers():
                if hasattr(org, "_lora_org_weight") and not org._lora_restored:
                    with torch.no_grad():
                        org.weight.copy_(org._lora_org_weight)
                    org._lora_restored = True
            lora.enabled = True

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """Merge each module into its base weight(s) and switch the module off (faster generation)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            for org, delta in lora.layer_deltas():
                org.weight.add_(delta.to(org.weight))
                org._lora_restored = False
            lora.enabled = False


__all__ = ["create_network", "create_network_from_weights", "LoRANetwork", "LoRAModule"]
