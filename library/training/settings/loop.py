"""The loop's section of the run settings: step arithmetic (``LoopPlan``) and what the loop does per step."""
from __future__ import annotations

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
    """What the training loop needs besides its plan: the step budget it is planned from, per-step randomness,
    clipping, sampling cadence, graceful Ctrl-C, gradient checks and the remedy hints of a non-finite failure."""

    seed: int
    max_train_steps: int = 1600
    max_train_epochs: Optional[int] = None  # wins over max_train_steps
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping
    save_state: bool = False  # a first Ctrl-C saves a resumable state (one process)
    sample_at_first: bool = False
    sample_every_n_steps: Optional[int] = None
    sample_every_n_epochs: Optional[int] = None
    check_grads: bool = False
    remedies: dict[str, str] = field(default_factory=remedies_for)


def loop_plan(loop: LoopSettings, batches_per_epoch: int) -> LoopPlan:
    """Step arithmetic (spec cli-options §4.2): ``--max_train_epochs`` wins over ``--max_train_steps``."""
    steps_per_epoch = math.ceil(batches_per_epoch / loop.gradient_accumulation_steps)
    max_steps = loop.max_train_steps
    if loop.max_train_epochs:
        max_steps = loop.max_train_epochs * steps_per_epoch
        logger.info("--max_train_epochs %d -> %d steps", loop.max_train_epochs, max_steps)
    return LoopPlan(batches_per_epoch, loop.gradient_accumulation_steps, max_steps,
                    math.ceil(max_steps / steps_per_epoch))
