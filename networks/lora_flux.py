"""FLUX.1 LoRA as a ``--network_module`` plug-in, in sd-scripts' file format (networks/lora_flux.py upstream).

``create_network(multiplier, dim, alpha, ae, [clip_l, t5xxl], transformer, neuron_dropout, **network_args)`` and
``create_network_from_weights(multiplier, file, ae, [clip_l, t5xxl], transformer, ...)`` keep upstream's
signatures. Files name BFL layers (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te1_`` CLIP-L,
``lora_te3_`` T5-XXL); the transformer is diffusers' ``FluxTransformer2DModel``, so a fused BFL layer is one
:class:`~networks.lora_fused.FusedLoRAModule` over the diffusers layers it splits into. Files may also be
diffusers' own FLUX LoRA format (``transformer.…lora_A.weight``): they are converted on reading.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import UserError
from library.formats.lora_io import load_state_dict_file

from .lora import LoRANetwork, _opt_float, dims_from_weights
from .lora_flux_convert import diffusers_to_kohya, is_diffusers_format, layer_paths
from .lora_flux_options import FluxLoRAOptions, parse_block_selection, parse_flux_options
from .lora_flux_targets import FluxTarget, all_targets, clip_targets, t5_targets, transformer_targets
from .lora_fused import FusedLoRAModule
from .lora_modules import LoRAModule

logger = logging.getLogger(__name__)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, ae, text_encoders,
                   flux: nn.Module, neuron_dropout: float | None = None, **kwargs: Any) -> "FluxLoRANetwork":
    """A new FLUX LoRA from ``--network_dim/alpha/dropout`` and string ``--network_args`` (upstream's names)."""
    options = parse_flux_options(kwargs)
    return FluxLoRANetwork(text_encoders, flux, multiplier=multiplier,
                           lora_dim=4 if network_dim is None else int(network_dim),
                           alpha=1.0 if network_alpha is None else float(network_alpha), dropout=neuron_dropout,
                           rank_dropout=_opt_float(kwargs, "rank_dropout"),
                           module_dropout=_opt_float(kwargs, "module_dropout"), options=options)


def read_flux_weights(file: str | None, weights_sd: Mapping[str, torch.Tensor] | None, text_encoders,
                      flux: nn.Module | None) -> dict[str, torch.Tensor]:
    """A FLUX LoRA file (sd-scripts' or diffusers' format) as sd-scripts' state dict, checked against the model."""
    where = f"--network_weights {file}" if file is not None else "network weights"
    state_dict = dict(load_state_dict_file(file) if weights_sd is None else weights_sd)
    targets = all_targets(text_encoders, flux)
    if is_diffusers_format(state_dict):
        state_dict = diffusers_to_kohya(state_dict, targets, layer_paths(text_encoders, flux), where)
    check_flux_weights(state_dict, targets, where)
    return state_dict


def check_flux_weights(state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, FluxTarget],
                       where: str) -> None:
    """Every module names a layer of this model, has both factors, and fits the layer's widths (one line)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in state_dict.items():
        name, _, rest = key.partition(".")
        modules.setdefault(name, {})[rest] = tuple(value.shape)
    unknown = sorted(name for name in modules if name not in targets)
    if unknown:
        hint = " (T5-XXL modules: give the T5-XXL model)" if any(n.startswith("lora_te3_") for n in unknown) else ""
        raise UserError(f"{where}: {len(unknown)} of its {len(modules)} modules name no layer of this FLUX.1 model "
                        f"(e.g. {', '.join(unknown[:3])}){hint}")
    for name, parts in sorted(modules.items()):
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise UserError(f"{where}: module {name} lacks lora_down.weight or lora_up.weight")
        target = targets[name]
        if len(down) != 2 or len(up) != 2 or down[1] != target.in_features or up[0] != target.out_features \
                or up[1] != down[0]:
            raise UserError(f"{where}: module {name}: lora_down {down} / lora_up {up} do not fit the model's layer "
                            f"({target.out_features}, {target.in_features}): a LoRA for a model of other widths")


def create_network_from_weights(multiplier: float, file: str | None, ae, text_encoders, flux: nn.Module,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any) -> tuple["FluxLoRANetwork", dict[str, torch.Tensor]]:
    """A network shaped like a saved file (its modules, ranks, alphas); returns it with the kohya state dict."""
    parse_flux_options(kwargs)  # refuses unsupported options; the layer choice comes from the file
    state_dict = read_flux_weights(file, weights_sd, text_encoders, flux)
    modules_dim, modules_alpha = dims_from_weights(state_dict)
    network = FluxLoRANetwork(text_encoders, flux, multiplier=multiplier, modules_dim=modules_dim,
                              modules_alpha=modules_alpha)
    return network, state_dict


class FluxLoRANetwork(LoRANetwork):
    """LoRA modules of FLUX.1: CLIP-L (and T5-XXL with ``train_t5xxl``) first, then the transformer."""

    def __init__(self, text_encoders, flux: nn.Module, *, options: FluxLoRAOptions | None = None, **kwargs: Any):
        self.flux_options = options or FluxLoRAOptions()
        encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        self._encoders = encoders + [None] * (2 - len(encoders))
        self._flux_ref = (flux,)  # a tuple keeps the transformer out of this network's modules
        super().__init__(self._encoders, flux, **kwargs)

    @property
    def _transformer(self) -> nn.Module | None:
        return self._flux_ref[0]

    # --- which layers ---------------------------------------------------------------------------
    def _build_modules(self, text_encoders, flux) -> tuple[list[LoRAModule], list[LoRAModule]]:
        clip_l, t5 = self._encoders[:2]
        from_weights = self._dims[1] is not None
        te = clip_targets(clip_l) if clip_l is not None else []
        if t5 is not None and (from_weights or self.flux_options.train_t5xxl):
            te += t5_targets(t5)
        unet = transformer_targets(flux) if flux is not None else []
        if not from_weights:
            unet = self._selected(unet, flux)
        return self._create_modules(te), self._create_modules(unet)

    def _selected(self, targets: list[FluxTarget], flux: nn.Module) -> list[FluxTarget]:
        """``train_blocks`` and the block-index selections; embedders only with ``in_dims``."""
        opts = self.flux_options
        keep = {"all": ("double", "single"), "double": ("double",), "single": ("single",)}[opts.train_blocks]
        chosen = {"double": [True] * flux.config.num_layers, "single": [True] * flux.config.num_single_layers}
        for kind, selection, key in (("double", opts.double_indices, "train_double_block_indices"),
                                     ("single", opts.single_indices, "train_single_block_indices")):
            if selection is not None:
                chosen[kind] = parse_block_selection(selection, len(chosen[kind]), key)
        return [t for t in targets if (t.kind == "in" and opts.in_dims is not None)
                or (t.kind in keep and chosen[t.kind][t.block])]

    def _dim_alpha(self, target: FluxTarget) -> tuple[int | None, float | None]:
        _, modules_dim, modules_alpha = self._dims
        if modules_dim is not None:  # from weights: only names present in the file
            return modules_dim.get(target.lora_name), (modules_alpha or {}).get(target.lora_name)
        opts = self.flux_options
        for pattern, dim in opts.reg_dims:  # upstream: a matching expression decides before anything else
            if re.search(pattern, target.lora_name):
                return dim, self.alpha
        if target.kind == "in":
            return opts.in_dims[target.block], self.alpha
        if target.is_unet:
            for parts, dim in opts.type_dims:
                if all(p in target.lora_name for p in parts):
                    return dim, self.alpha  # 0 leaves the layer out
        return self.lora_dim, self.alpha

    def _create_modules(self, targets) -> list[LoRAModule]:
        loras = []
        for target in targets:
            dim, alpha = self._dim_alpha(target)
            if not dim:
                continue
            if len(target.layers) > 1:
                lora = FusedLoRAModule(target.lora_name, list(target.layers), self.multiplier, dim, alpha,
                                       self.dropout, self.rank_dropout, self.module_dropout)
            else:
                lora = LoRAModule(target.lora_name, target.layers[0], self.multiplier, dim, alpha, self.dropout,
                                  self.rank_dropout, self.module_dropout)
            if self.flux_options.verbose:
                logger.info("%-50s rank %d, alpha %s", target.lora_name, dim, alpha)
            loras.append(lora)
        return loras

    # --- files ----------------------------------------------------------------------------------
    def load_weights(self, file: str) -> Any:
        """Load sd-scripts' or diffusers' FLUX LoRA format; a module that fits no layer is a ``UserError``."""
        state_dict = read_flux_weights(file, None, self._encoders, self._transformer)
        info = self.load_state_dict(state_dict, strict=False)
        logger.info("weights loaded from %s: %s", file, info)
        return info

    def merge_to(self, text_encoders, flux, weights_sd: Mapping[str, torch.Tensor], dtype=None, device=None) -> None:
        if is_diffusers_format(weights_sd):
            weights_sd = read_flux_weights(None, weights_sd, self._encoders, self._transformer)
        super().merge_to(text_encoders, flux, weights_sd, dtype, device)

    # --- training -------------------------------------------------------------------------------
    def prepare_optimizer_params(self, text_encoder_lr, unet_lr: float | None,
                                 default_lr: float | None = None) -> list[dict]:
        """CLIP-L, T5-XXL and transformer groups; ``text_encoder_lr`` may be one LR or [CLIP-L, T5] (upstream)."""
        self.requires_grad_(True)
        lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        lrs = (lrs or [None]) + [None]
        te_lrs = {"lora_te1": lrs[0], "lora_te3": lrs[1] if len(lrs) > 2 else lrs[0]}
        groups = []
        for prefix, lr in te_lrs.items():
            loras = [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(prefix + "_")]
            groups += [self._group(loras, lr)] if loras else []
        if self.unet_loras:
            groups.append(self._group(self.unet_loras, unet_lr))
        return groups

    @staticmethod
    def _group(loras: list[LoRAModule], lr: float | None) -> dict:
        group: dict = {"params": [p for lora in loras for p in lora.trainable_parameters()]}
        if lr is not None:
            group["lr"] = lr
        return group

    def set_region(self, sub_prompt_index: int, is_last_network: bool, mask: torch.Tensor | None) -> None:
        """Regional LoRA maps U-Net feature maps to image regions; FLUX has none, so it is refused."""
        if mask is not None and not bool((mask >= 1).all()):
            raise UserError("regional LoRA (a mask per sub-prompt) is not supported for FLUX.1 networks")


__all__ = ["create_network", "create_network_from_weights", "FluxLoRANetwork", "read_flux_weights"]
