"""The one adapter between the training loop and any ``--network_module`` plug-in (spec file-formats §a.3).

``networks.lora``, ``lycoris.kohya`` and third-party modules are reached only through ``NetworkHost``:
it imports the module by name, adds the ``dropout`` kwarg as sd-scripts does, tolerates the old
2-argument ``prepare_optimizer_params`` and the newer ``(groups, descriptions)`` return value, and turns
every optional method into an explicit no-op when the plug-in lacks it. ``--network_args`` values stay
strings: the plug-in parses them (spec cli-options §12, pitfall 6).
"""
from __future__ import annotations

import importlib
import inspect
import logging
from types import ModuleType
from typing import Any, Iterable, Mapping

import torch

from library.errors import UserError
from networks.lora_family import check_family, check_fits_network, model_family_of, read_tensor_file

logger = logging.getLogger(__name__)


def parse_network_args(items: Iterable[str] | None, option: str = "--network_args") -> dict[str, str]:
    """``["key=value", ...]`` -> ``{key: value}`` with values kept as strings; a malformed item is a UserError
    naming ``option``."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option} item {item!r} is not key=value")
        result[key.strip()] = value.strip()
    return result


def import_network_module(name: str) -> ModuleType:
    """Import ``--network_module`` (e.g. ``networks.lora``, ``lycoris.kohya``) and check the required functions."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        hint = " (pip install lycoris-lora)" if name.startswith("lycoris") else ""
        raise UserError(f"--network_module {name}: cannot import {e.name}{hint}") from None
    return check_network_module(module)


def check_network_module(module: ModuleType) -> ModuleType:
    """The module itself, if it has the two required functions of spec §a.3."""
    missing = [f for f in ("create_network", "create_network_from_weights") if not hasattr(module, f)]
    if missing:
        raise UserError(f"--network_module {module.__name__} lacks {', '.join(missing)}: not a network plug-in")
    return module


class NetworkHost:
    """A plug-in module plus the network it built; every call from the loop goes through here."""

    def __init__(self, module: ModuleType | str):
        self.module = import_network_module(module) if isinstance(module, str) else check_network_module(module)
        self.network: Any = None
        self.weights_sd: Mapping[str, torch.Tensor] | None = None
        self.model_family: str | None = None  # sd1/sd2/sdxl of the models the network was built on

    # --- building -------------------------------------------------------------------------------
    def create(self, multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
               unet, network_dropout: float | None = None, network_args: Mapping[str, str] | None = None) -> Any:
        """``create_network`` with ``dropout=<network_dropout>`` added when the user did not pass one."""
        self.model_family = _model_family(text_encoder, unet)
        kwargs = dict(network_args or {})
        if "dropout" not in kwargs:
            kwargs["dropout"] = network_dropout  # LyCORIS reads dropout from kwargs (spec cli §12)
        self.network = self.module.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                                   neuron_dropout=network_dropout, **kwargs)
        return self.network

    def create_from_weights(self, multiplier: float, file: str | None, vae, text_encoder, unet,
                            weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                            network_args: Mapping[str, str] | None = None) -> Any:
        """``create_network_from_weights`` (``--dim_from_weights``, merging, generation); no dropout added.

        A LoRA file of another model family is refused here, before a network of no modules is built."""
        self.model_family = _model_family(text_encoder, unet)
        if file is not None and weights_sd is None:
            self._check_family(file)
        self.network, self.weights_sd = self.module.create_network_from_weights(
            multiplier, file, vae, text_encoder, unet, weights_sd=weights_sd, for_inference=for_inference,
            **dict(network_args or {}))
        return self.network

    # --- required methods ----------------------------------------------------------------------
    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        self.network.apply_to(text_encoder, unet, apply_text_encoder, apply_unet)

    def load_weights(self, file: str) -> Any:
        """``--network_weights``: checked against the network first, so nothing is silently left unloaded.

        A file of another model family, with a tensor of another shape (named with both shapes), or sharing
        no tensor with the network (e.g. only text-encoder modules with ``--network_train_unet_only``) is a
        ``UserError``; the plug-in then loads it as before (a partial match is fine)."""
        tf = self._check_family(file)
        if hasattr(self.network, "state_dict"):
            shapes = {k: tuple(v.shape) for k, v in self.network.state_dict().items()}
            shared = check_fits_network(tf, shapes)
            logger.info("--network_weights %s: %d of its %d tensors load into the network", file, shared,
                        len(tf.shapes))
        return self.network.load_weights(file)

    def _check_family(self, file: str):
        """The file's tensor names and shapes, after checking it suits the model family (kohya names only)."""
        tf = read_tensor_file(file, "--network_weights")
        if self.model_family is not None and tf.modules():  # another plug-in's own names: nothing to tell
            check_family(tf, self.model_family, "--network_weights")
        return tf

    def param_groups(self, text_encoder_lr: float | None, unet_lr: float | None,
                     default_lr: float | None) -> list[dict]:
        """Optimizer param groups; old plug-ins take ``(text_encoder_lr, unet_lr)`` only."""
        prepare = self.network.prepare_optimizer_params
        if _accepts_positional(prepare, 3):
            result = prepare(text_encoder_lr, unet_lr, default_lr)
        else:
            result = prepare(text_encoder_lr, unet_lr)
        # newer plug-ins (LyCORIS, sd-scripts >= 0.9) return (groups, lr descriptions)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], list):
            result = result[0]
        if isinstance(result, list) and all(isinstance(g, dict) for g in result):
            return result
        return [{"params": list(result)}]  # a bare iterable of parameters: one group at the default LR

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.network.prepare_grad_etc(text_encoder, unet)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.network.on_epoch_start(text_encoder, unet)

    def get_trainable_params(self):
        return self.network.get_trainable_params()

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        self.network.save_weights(file, dtype, metadata)

    def enable_gradient_checkpointing(self) -> None:
        self.network.enable_gradient_checkpointing()

    def is_mergeable(self) -> bool:
        return bool(getattr(self.network, "is_mergeable", lambda: False)())

    def merge_to(self, text_encoder, unet, weights_sd, dtype=None, device=None) -> None:
        self.network.merge_to(text_encoder, unet, weights_sd, dtype, device)

    def has_no_text_encoder_modules(self) -> bool:
        """True when the network says (``text_encoder_loras == []``) it adapts no text encoder."""
        modules = getattr(self.network, "text_encoder_loras", None)
        return modules is not None and len(modules) == 0

    # --- optional methods: explicit no-ops when the plug-in lacks them ---------------------------
    def set_multiplier(self, multiplier: float) -> None:
        if hasattr(self.network, "set_multiplier"):
            self.network.set_multiplier(multiplier)
        # else: the plug-in keeps the multiplier it was created with

    def prepare_network(self, options: Any) -> None:
        """The plug-in contract: ``prepare_network`` receives the run's options, read-only (an ``OptionRecord``)."""
        if hasattr(self.network, "prepare_network"):
            self.network.prepare_network(options)

    def on_step_start(self, text_encoder, unet) -> None:
        if hasattr(self.network, "on_step_start"):
            self.network.on_step_start(text_encoder, unet)

    def apply_max_norm_regularization(self, max_norm: float, device) -> tuple[int, float, float] | None:
        """(keys_scaled, mean norm, max norm), or None when the plug-in cannot regularize (warned once)."""
        if hasattr(self.network, "apply_max_norm_regularization"):
            return self.network.apply_max_norm_regularization(max_norm, device)
        if not getattr(self, "_warned_max_norm", False):
            logger.warning("%s has no apply_max_norm_regularization: --scale_weight_norms is ignored",
                           self.module.__name__)
            self._warned_max_norm = True
        return None


def _model_family(text_encoder, unet) -> str:
    return model_family_of(text_encoder, unet)


def _accepts_positional(fn, count: int) -> bool:
    """Whether ``fn`` can be called with ``count`` positional arguments."""
    try:
        inspect.signature(fn).bind(*([None] * count))
        return True
    except TypeError:
        return False
    except ValueError:  # no signature (builtins): assume the current form
        return True

