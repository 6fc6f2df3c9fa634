"""Typed, frozen settings built once from the parsed options (issue 17 item 1, in progress).

The goal: one settings object with sections, built right after parsing, so that nothing below the runner
reads or writes the argparse ``Namespace``. Sections land one at a time; the loop's is the first: the
training loop (``library/training/loop``) reads only :class:`LoopSettings`, built by the runner.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from library.training.loop.nonfinite_guard import remedies_for

logger = logging.getLogger(__name__)


@dataclass
class LoopPlan:
    """Step arithmetic (spec cli-options §4.2): batches per epoch per process, steps, epochs."""

    batches_per_epoch: int
    grad_accum: int
    max_train_steps: int
    num_epochs: int


@dataclass(frozen=True)
class LoopSettings:
    """What the training loop needs besides its plan (``LoopPlan``): per-step randomness, clipping,
    sampling cadence, graceful Ctrl-C, gradient checks and the remedy hints of a non-finite failure."""

    seed: int
    max_grad_norm: float = 0.0  # 0: no clipping
    save_state: bool = False  # a first Ctrl-C saves a resumable state (one process)
    sample_at_first: bool = False
    sample_every_n_steps: Optional[int] = None
    sample_every_n_epochs: Optional[int] = None
    check_grads: bool = False
    remedies: dict[str, str] = field(default_factory=remedies_for)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoopSettings":
        return cls(seed=args.seed, max_grad_norm=args.max_grad_norm or 0.0, save_state=bool(args.save_state),
                   sample_at_first=bool(getattr(args, "sample_at_first", False)),
                   sample_every_n_steps=args.sample_every_n_steps, sample_every_n_epochs=args.sample_every_n_epochs,
                   check_grads=bool(getattr(args, "check_grads", False)), remedies=remedies_for(args))


def loop_plan(args: argparse.Namespace, batches_per_epoch: int) -> LoopPlan:
    """Step arithmetic (spec cli-options §4.2): ``--max_train_epochs`` wins over ``--max_train_steps``."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps
    if getattr(args, "max_train_epochs", None):
        max_steps = args.max_train_epochs * steps_per_epoch
        logger.info("--max_train_epochs %d -> %d steps", args.max_train_epochs, max_steps)
    return LoopPlan(batches_per_epoch, args.gradient_accumulation_steps, max_steps, math.ceil(max_steps / steps_per_epoch))
