"""Learning-rate schedulers by name (upstream ``get_scheduler_fix``), spec cli-options §8.

Named schedules are diffusers' ``TYPE_TO_SCHEDULER_FUNCTION`` (each a LambdaLR: step -> factor of the group's
initial lr); ``adafactor[:<lr>]`` is transformers' AdafactorSchedule; ``--lr_scheduler_type module.Class``
(no dot -> ``torch.optim.lr_scheduler``) builds any other class with ``--lr_scheduler_args``.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Optional

import torch
from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

from library.errors import UserError
from library.training.optim.optimizers import parse_kwargs

logger = logging.getLogger(__name__)

SCHEDULER_NAMES = tuple(t.value for t in TYPE_TO_SCHEDULER_FUNCTION) + ("adafactor",)


def _no_warmup(what: str, warmup_steps: Optional[int]) -> None:
    """Schedules without a warmup phase refuse --lr_warmup_steps (pitfall 3)."""
    if warmup_steps:
        raise UserError(f"{what} does not use --lr_warmup_steps ({warmup_steps}); set it to 0, "
                        "or use --lr_scheduler constant_with_warmup")


def _custom_scheduler(optimizer: torch.optim.Optimizer, scheduler_type: str, kwargs: dict) -> Any:
    """``a.b.C`` → class C of module a.b; no dot → torch.optim.lr_scheduler."""
    module_name, _, class_name = scheduler_type.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--lr_scheduler_type {scheduler_type}: class not found "
                        "(use a torch.optim.lr_scheduler class name or module.Class)") from e
    logger.info(f"use {scheduler_type} | {kwargs} as lr_scheduler")
    try:
        return cls(optimizer, **kwargs)
    except TypeError as e:  # a missing or unknown --lr_scheduler_args key
        raise UserError(f"--lr_scheduler_type {scheduler_type}: {e}") from e


def _adafactor_scheduler(optimizer: torch.optim.Optimizer, name: str) -> Any:
    """transformers' AdafactorSchedule, initial lr from ``adafactor:<lr>`` (set by the AdaFactor builder)."""
    from transformers.optimization import Adafactor, AdafactorSchedule  # start-up (transformers: ~1 s)

    if not isinstance(optimizer, Adafactor):
        raise UserError("--lr_scheduler adafactor needs --optimizer_type AdaFactor")
    _, _, initial = name.partition(":")
    try:
        initial_lr = float(initial) if initial else 0.0
    except ValueError as e:
        raise UserError(f"--lr_scheduler {name}: expected adafactor:<initial lr>") from e
    return AdafactorSchedule(optimizer, initial_lr)


def _named_scheduler(optimizer, kind: SchedulerType, warmup_steps: int, total: int, num_cycles: int,
                     power: float, kwargs: dict) -> Any:
    """Call diffusers' schedule function with only the arguments it takes (as upstream does)."""
    func = TYPE_TO_SCHEDULER_FUNCTION[kind]
    if kind == SchedulerType.CONSTANT:
        _no_warmup("--lr_scheduler constant", warmup_steps)
        return func(optimizer, **kwargs)
    if kind == SchedulerType.PIECEWISE_CONSTANT:
        return func(optimizer, **kwargs)  # step_rules come from --lr_scheduler_args
    if kind == SchedulerType.CONSTANT_WITH_WARMUP:
        return func(optimizer, num_warmup_steps=warmup_steps, **kwargs)
    if kind == SchedulerType.COSINE_WITH_RESTARTS:
        kwargs = {"num_cycles": num_cycles, **kwargs}
    elif kind == SchedulerType.POLYNOMIAL:
        kwargs = {"power": power, **kwargs}
    return func(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total, **kwargs)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "constant",
    warmup_steps: Optional[int] = 0,
    total_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    scheduler_type: Optional[str] = None,
    scheduler_args: Optional[list[str]] = None,
    num_processes: int = 1,
) -> Any:
    """The LR scheduler of spec cli-options §8; ``total_steps`` is --max_train_steps (per process)."""
    # upstream quirk kept: the total is multiplied by the process count but the warmup is not, because
    # accelerate steps a prepared scheduler once per process (pitfall 4)
    total = total_steps * num_processes
    warmup = warmup_steps or 0
    kwargs = parse_kwargs(scheduler_args, "--lr_scheduler_args")
    if scheduler_type:
        _no_warmup(f"--lr_scheduler_type {scheduler_type}", warmup)
        return _custom_scheduler(optimizer, scheduler_type, kwargs)
    if name.startswith("adafactor"):
        _no_warmup("--lr_scheduler adafactor", warmup)
        return _adafactor_scheduler(optimizer, name)
    try:
        kind = SchedulerType(name)
    except ValueError as e:
        raise UserError(f"--lr_scheduler {name}: unknown scheduler; use one of {', '.join(SCHEDULER_NAMES)}") from e
    try:
        return _named_scheduler(optimizer, kind, warmup, total, num_cycles, power, kwargs)
    except (TypeError, ValueError) as e:  # e.g. polynomial lr_end ≥ lr, a bad --lr_scheduler_args key
        raise UserError(f"--lr_scheduler {name}: {e}") from e


def check_scheduler(name: str, scheduler_type: Optional[str], scheduler_args: Optional[list[str]],
                    optimizer_type: Optional[str] = None) -> None:
    """Before any model loads: the schedule name is known or the custom class resolves, and its args parse.
    (Whether the arguments fit the class is only known when it is built.)"""
    parse_kwargs(scheduler_args, "--lr_scheduler_args")
    if scheduler_type:
        module_name, _, class_name = scheduler_type.rpartition(".")
        try:
            module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
            getattr(module, class_name)
        except (ImportError, AttributeError):
            raise UserError(f"--lr_scheduler_type {scheduler_type}: class not found "
                            "(use a torch.optim.lr_scheduler class name or module.Class)") from None
        return
    if name.startswith("adafactor"):
        if (optimizer_type or "").lower() != "adafactor":
            raise UserError("--lr_scheduler adafactor needs --optimizer_type AdaFactor")
        return
    if name not in SCHEDULER_NAMES:
        raise UserError(f"--lr_scheduler {name}: unknown scheduler; use one of {', '.join(SCHEDULER_NAMES)}")
