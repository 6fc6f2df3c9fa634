"""Optimizers by name: one small builder per ``--optimizer_type``, spec cli-options §8.

``OPTIMIZERS`` maps the built-in names (matched case-insensitively) to builders; any other name is a
``module.Class`` (no dot → ``torch.optim``). Optional packages are imported lazily, and a missing one is a
``UserError`` that names the pip command.
"""
from __future__ import annotations

import ast
import importlib
import logging
from typing import Any, Callable, Iterable, Optional

import torch

from library.config.config_rules import closest_option
from library.errors import UserError

logger = logging.getLogger(__name__)

Params = Any  # an iterable of tensors or a list of param-group dicts
# builder(params, lr, kwargs) -> optimizer; kwargs may be completed in place (momentum, relative_step) so
# that the ss_optimizer metadata shows the values actually used, as upstream does.
Builder = Callable[[Params, Optional[float], dict], torch.optim.Optimizer]

_PIP = {"bitsandbytes": "bitsandbytes", "lion_pytorch": "lion-pytorch", "dadaptation": "dadaptation",
        "prodigyopt": "prodigyopt", "transformers": "transformers"}


def _import(module: str, optimizer_type: str):
    """Import an optional package or raise a UserError naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = _PIP.get(module.split(".")[0], module.split(".")[0])
        raise UserError(f"--optimizer_type {optimizer_type} needs {package}: pip install {package}") from e


def _class_builder(module: str, class_name: str, display: str, **fixed: Any) -> Builder:
    """Builder for ``module.class_name(params, lr=lr, **fixed, **kwargs)``."""

    def build(params: Params, lr: Optional[float], kwargs: dict) -> torch.optim.Optimizer:
        mod = _import(module, display)
        try:
            cls = getattr(mod, class_name)
        except AttributeError as e:  # an old bitsandbytes lacks the Lion8bit / Paged* classes
            raise UserError(f"--optimizer_type {display}: {module}.{class_name} not found; "
                            f"upgrade it: pip install -U {_PIP.get(module.split('.')[0], module)}") from e
        return cls(params, lr=lr, **fixed, **kwargs)

    build.source = (module, class_name)  # type: ignore[attr-defined]
    return build


def _sgd_nesterov_builder(module: str, class_name: str, display: str) -> Builder:
    """SGD with nesterov=True and momentum defaulting to 0.9 (nesterov needs momentum > 0)."""
    inner = _class_builder(module, class_name, display, nesterov=True)

    def build(params: Params, lr: Optional[float], kwargs: dict) -> torch.optim.Optimizer:
        kwargs.setdefault("momentum", 0.9)
        return inner(params, lr, kwargs)

    build.source = (module, class_name)  # type: ignore[attr-defined]
    return build


def _adafactor(params: Params, lr: Optional[float], kwargs: dict) -> torch.optim.Optimizer:
    """transformers' Adafactor; lr is None here when relative_step is on (see :func:`_prepare_adafactor`)."""
    mod = _import("transformers.optimization", "AdaFactor")
    return mod.Adafactor(params, lr=lr, **kwargs)


OPTIMIZERS: dict[str, Builder] = {
    "AdamW": _class_builder("torch.optim", "AdamW", "AdamW"),
    "AdamW8bit": _class_builder("bitsandbytes.optim", "AdamW8bit", "AdamW8bit"),
    "PagedAdamW8bit": _class_builder("bitsandbytes.optim", "PagedAdamW8bit", "PagedAdamW8bit"),
    "PagedAdamW": _class_builder("bitsandbytes.optim", "PagedAdamW", "PagedAdamW"),
    "PagedAdamW32bit": _class_builder("bitsandbytes.optim", "PagedAdamW32bit", "PagedAdamW32bit"),
    "Lion": _class_builder("lion_pytorch", "Lion", "Lion"),
    "Lion8bit": _class_builder("bitsandbytes.optim", "Lion8bit", "Lion8bit"),
    "PagedLion8bit": _class_builder("bitsandbytes.optim", "PagedLion8bit", "PagedLion8bit"),
    "SGDNesterov": _sgd_nesterov_builder("torch.optim", "SGD", "SGDNesterov"),
    "SGDNesterov8bit": _sgd_nesterov_builder("bitsandbytes.optim", "SGD8bit", "SGDNesterov8bit"),
    "DAdaptation": _class_builder("dadaptation.experimental", "DAdaptAdamPreprint", "DAdaptation"),
    "DAdaptAdamPreprint": _class_builder("dadaptation.experimental", "DAdaptAdamPreprint", "DAdaptAdamPreprint"),
    "DAdaptAdaGrad": _class_builder("dadaptation", "DAdaptAdaGrad", "DAdaptAdaGrad"),
    "DAdaptAdam": _class_builder("dadaptation", "DAdaptAdam", "DAdaptAdam"),
    "DAdaptAdan": _class_builder("dadaptation", "DAdaptAdan", "DAdaptAdan"),
    "DAdaptAdanIP": _class_builder("dadaptation.experimental", "DAdaptAdanIP", "DAdaptAdanIP"),
    "DAdaptLion": _class_builder("dadaptation", "DAdaptLion", "DAdaptLion"),
    "DAdaptSGD": _class_builder("dadaptation", "DAdaptSGD", "DAdaptSGD"),
    "Prodigy": _class_builder("prodigyopt", "Prodigy", "Prodigy"),
    "AdaFactor": _adafactor,
}
_BY_LOWER = {name.lower(): name for name in OPTIMIZERS}
# built-in name -> (module, class) it builds, for the check before any model loads
_SOURCES = {name: getattr(builder, "source", ("transformers.optimization", "Adafactor"))
            for name, builder in OPTIMIZERS.items()}


def parse_kwargs(pairs: Optional[Iterable[str]], option: str = "--optimizer_args") -> dict[str, Any]:
    """``key=value`` strings → kwargs, values via ast.literal_eval ("0.9,0.999" → tuple), else kept as str."""
    kwargs: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option}: expected key=value, got {pair!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # upstream raises here; a bare word (e.g. a mode name) is more useful as a string
        kwargs[key.strip()] = value
    return kwargs


def resolve_optimizer_type(
    optimizer_type: Optional[str], use_8bit_adam: bool = False, use_lion_optimizer: bool = False
) -> str:
    """Apply the legacy flags and the AdamW default; returns the name as given (not lower-cased)."""
    if use_8bit_adam or use_lion_optimizer:
        if use_8bit_adam and use_lion_optimizer:
            raise UserError("--use_8bit_adam and --use_lion_optimizer cannot be used together")
        legacy = "--use_8bit_adam" if use_8bit_adam else "--use_lion_optimizer"
        if optimizer_type:
            raise UserError(f"{legacy} cannot be combined with --optimizer_type; use --optimizer_type only")
        return "AdamW8bit" if use_8bit_adam else "Lion"
    return optimizer_type or "AdamW"


def _warn_adaptive_lr(param_groups: Params, lr: float) -> None:
    """D-Adaptation / Prodigy want lr ≈ 1.0 and only honour the first group's lr (upstream warnings)."""
    actual_lr, lr_count = lr, 1
    if isinstance(param_groups, list) and param_groups and isinstance(param_groups[0], dict):
        actual_lr = param_groups[0].get("lr", lr)
        lr_count = len({group.get("lr", actual_lr) for group in param_groups})
    if actual_lr <= 0.1:
        logger.warning(f"learning rate is too low for D-Adaptation/Prodigy; set it around 1.0: lr={actual_lr}")
    if lr_count > 1:
        logger.warning(f"with D-Adaptation/Prodigy only the first learning rate takes effect: lr={actual_lr}")


def _prepare_adafactor(param_groups: Params, lr: float, kwargs: dict, extra: dict) -> Optional[float]:
    """relative_step defaults to True; then lr → None, group LRs dropped, scheduler forced to adafactor:<lr>."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("set relative_step to True because warmup_init is True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return lr
    if lr != 0.0:
        logger.warning("AdaFactor with relative_step: the learning rate is used as the initial lr only")
    if isinstance(param_groups, list) and param_groups and isinstance(param_groups[0], dict):
        dropped = [group.pop("lr", None) for group in param_groups]
        if any(v is not None for v in dropped):
            logger.warning("AdaFactor with relative_step: unet_lr and text_encoder_lr are ignored")
            extra["group_lrs_ignored"] = True
    extra["lr_scheduler"] = f"adafactor:{lr}"
    extra["learning_rate"] = None
    return None


def _custom_class(optimizer_type: str) -> type:
    """``a.b.C`` → class C of module a.b; a name without a dot is looked up in torch.optim."""
    module_name, _, class_name = optimizer_type.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim
        return getattr(module, class_name)
    except (ImportError, AttributeError) as e:
        close = closest_option(optimizer_type, OPTIMIZERS)
        hint = f"did you mean {close}? Otherwise use" if close else "use"
        raise UserError(f"--optimizer_type {optimizer_type}: unknown optimizer; {hint} one of "
                        f"{', '.join(OPTIMIZERS)}, a torch.optim class name, or module.Class") from None


def check_optimizer(optimizer_type: Optional[str], use_8bit_adam: bool = False,
                    use_lion_optimizer: bool = False) -> str:
    """Before any model loads: the optimizer name resolves and its package imports (the same errors
    ``build_optimizer`` would raise later); returns the resolved name."""
    name = resolve_optimizer_type(optimizer_type, use_8bit_adam, use_lion_optimizer)
    builtin = _BY_LOWER.get(name.lower())
    if builtin is not None:
        module, class_name = _SOURCES[builtin]
        mod = _import(module, builtin)
        if not hasattr(mod, class_name):
            raise UserError(f"--optimizer_type {builtin}: {module}.{class_name} not found; "
                            f"upgrade it: pip install -U {_PIP.get(module.split('.')[0], module)}")
    elif name.lower().endswith("8bit") and "." not in name:
        raise UserError(f"--optimizer_type {name}: unknown 8-bit optimizer; use one of "
                        + ", ".join(n for n in OPTIMIZERS if n.lower().endswith("8bit")))
    else:
        _custom_class(name)
    return name


def build_optimizer(
    param_groups: Params,
    optimizer_type: Optional[str],
    learning_rate: float,
    optimizer_args: Optional[list[str]] = None,
    use_8bit_adam: bool = False,
    use_lion_optimizer: bool = False,
) -> tuple[torch.optim.Optimizer, str, dict]:
    """Build the optimizer of spec cli-options §8.

    Returns ``(optimizer, ss_optimizer string, extra)``; ``extra`` holds ``optimizer_kwargs`` (as used),
    ``learning_rate`` (None for AdaFactor with relative_step), ``lr_scheduler`` (the forced
    ``adafactor:<lr>`` name, else None) and ``group_lrs_ignored``.
    """
    name = resolve_optimizer_type(optimizer_type, use_8bit_adam, use_lion_optimizer)
    kwargs = parse_kwargs(optimizer_args)
    extra: dict[str, Any] = {"learning_rate": learning_rate, "lr_scheduler": None, "group_lrs_ignored": False}
    builtin = _BY_LOWER.get(name.lower())
    lr: Optional[float] = learning_rate
    if builtin is not None:
        if builtin.startswith("DAdapt") or builtin == "Prodigy":
            _warn_adaptive_lr(param_groups, learning_rate)
        if builtin == "AdaFactor":
            lr = _prepare_adafactor(param_groups, learning_rate, kwargs, extra)
        optimizer = OPTIMIZERS[builtin](param_groups, lr, kwargs)
    elif name.lower().endswith("8bit") and "." not in name:
        # upstream sends every *8bit name to bitsandbytes; only the listed ones exist there
        raise UserError(f"--optimizer_type {name}: unknown 8-bit optimizer; use one of "
                        + ", ".join(n for n in OPTIMIZERS if n.lower().endswith("8bit")))
    else:
        cls = _custom_class(name)
        logger.info(f"use {name} | {kwargs}")
        optimizer = cls(param_groups, lr=lr, **kwargs)
    extra["optimizer_kwargs"] = kwargs
    return optimizer, optimizer_metadata_name(optimizer, kwargs), extra


def optimizer_metadata_name(optimizer: torch.optim.Optimizer, optimizer_kwargs: Optional[dict] = None) -> str:
    """The ``ss_optimizer`` value: ``<module>.<Class>`` plus ``(k=v,k=v)`` when kwargs exist."""
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    if optimizer_kwargs:
        name += "(" + ",".join(f"{k}={v}" for k, v in optimizer_kwargs.items()) + ")"
    return name
