"""The optimizer step inside the backward pass (sd-scripts v0.9's ``--fused_backward_pass`` and
``--fused_optimizer_groups``): gradients are consumed and freed while backward runs, so a whole model's
gradients never exist at once (for SDXL's 2.6 B-parameter U-Net that is 10 GB in float32).

* ``--fused_backward_pass`` (AdaFactor): each parameter is stepped in its own post-accumulate-grad hook,
  and its gradient is dropped right after.
* ``--fused_optimizer_groups N``: the parameters are split into about N optimizers (any type); each steps
  once all of its parameters have their gradients, then frees them.

As in sd-scripts, ``--max_grad_norm`` then clips each parameter's gradient on its own (a global norm would
need every gradient at once). The loop sees a :class:`BackwardStepOptimizer` and a :class:`SchedulerSet`:
``step()`` only finishes what the hooks left (a chunk whose parameters did not all get a gradient this step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's wrapper: the hooks step it directly (no loss scaler is in play:
    the fused modes refuse fp16 mixed precision up front)."""
    return getattr(optimizer, "optimizer", optimizer)


def _clip(param: torch.Tensor, max_grad_norm: float) -> None:
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([param], max_grad_norm)


def step_one_parameter(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> None:
    """``optimizer.step()`` for ``param`` alone, with its group's current settings (lr set by the scheduler).

    The optimizer's own ``step`` runs on a one-parameter view of the group, so the update is exactly the one
    the plain step computes for that parameter (AdaFactor treats parameters independently)."""
    groups = optimizer.param_groups
    optimizer.param_groups = [{**group, "params": [param]}]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


class BackwardStepOptimizer:
    """What the training loop steps when the real steps happen in the backward hooks.

    ``param_groups`` are every wrapped optimizer's groups in order (learning-rate logs, D-Adaptation's d*lr);
    ``step()`` finishes the step, ``zero_grad()`` drops any gradient a hook did not consume.
    """

    steps_in_backward = True

    def __init__(self, optimizers: Sequence, finish: Callable[[], None]):
        self.optimizers = list(optimizers)
        self._finish = finish

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in _unwrap(opt).param_groups]

    def step(self) -> None:
        self._finish()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            _unwrap(opt).zero_grad(set_to_none=set_to_none)


class SchedulerSet:
    """One learning-rate scheduler per optimizer, stepped together; ``get_last_lr`` reports one rate per
    *logical* group (U-Net or a block, text encoder 1, text encoder 2), read from the optimizer that holds
    that group's first parameter."""

    def __init__(self, schedulers: Sequence, first_chunk_of_group: Sequence[int]):
        self.schedulers = list(schedulers)
        self.first_chunk_of_group = list(first_chunk_of_group)

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return [self.schedulers[i].get_last_lr()[0] for i in self.first_chunk_of_group]


def attach_fused_adafactor(optimizer, max_grad_norm: float) -> BackwardStepOptimizer:
    """``--fused_backward_pass``: every trained parameter steps in its own hook, then drops its gradient."""
    inner = _unwrap(optimizer)

    def hook_for(group: dict) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            _clip(param, max_grad_norm)
            step_one_parameter(inner, group, param)
            param.grad = None

        return hook

    for group in inner.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(hook_for(group))
    return BackwardStepOptimizer([optimizer], finish=lambda: None)


@dataclass(frozen=True)
class Chunk:
    """Consecutive parameters of one learning rate: one optimizer of ``--fused_optimizer_groups``."""

    params: list
    lr: Optional[float]
    logical_group: int  # the param group (of the unsplit list) its first parameter came from


def split_into_chunks(groups: Sequence[dict], n_optimizers: int) -> list[Chunk]:
    """sd-scripts' split: ceil(total / N) parameters per chunk, a new chunk wherever the learning rate changes
    (so there may be more than N); groups of equal rate that follow each other share chunks."""
    total = sum(len(g["params"]) for g in groups)
    per_chunk = max(1, -(-total // n_optimizers))
    chunks: list[Chunk] = []
    params: list = []
    lr: object = object()  # no learning rate yet
    first = 0
    for index, group in enumerate(groups):
        for param in group["params"]:
            if group.get("lr") != lr and params:
                chunks.append(Chunk(params, lr, first))
                params = []
            if not params:
                first = index
            lr = group.get("lr")
            params.append(param)
            if len(params) == per_chunk:
                chunks.append(Chunk(params, lr, first))
                params, lr = [], object()
    if params:
        chunks.append(Chunk(params, lr, first))
    return chunks


def first_chunk_of_groups(chunks: Sequence[Chunk], groups: Sequence[dict]) -> list[int]:
    """For each logical group, the chunk holding its first parameter (where its learning rate is read)."""
    where = {id(p): i for i, chunk in enumerate(chunks) for p in chunk.params}
    return [where[id(g["params"][0])] for g in groups if g["params"]]


class ChunkStepper:
    """``--fused_optimizer_groups``: counts each optimizer's parameters as their gradients arrive and steps it
    when the count is complete; :meth:`finish` steps the optimizers left incomplete (parameters without a
    gradient this step) and resets the counts."""

    def __init__(self, optimizers: Sequence, max_grad_norm: float):
        self.optimizers = [_unwrap(o) for o in optimizers]
        self.max_grad_norm = max_grad_norm
        self.totals = [0] * len(self.optimizers)
        self.counts = [0] * len(self.optimizers)
        for i, opt in enumerate(self.optimizers):
            for group in opt.param_groups:
                for param in group["params"]:
                    if param.requires_grad:
                        param.register_post_accumulate_grad_hook(self._hook_for(i))
                        self.totals[i] += 1

    def _hook_for(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            _clip(param, self.max_grad_norm)
            self.counts[i] += 1
            if self.counts[i] == self.totals[i]:
                self._step(i)

        return hook

    def _step(self, i: int) -> None:
        self.optimizers[i].step()
        self.optimizers[i].zero_grad(set_to_none=True)
        self.counts[i] = -1  # done for this step (a late gradient cannot step it twice)

    def finish(self) -> None:
        for i, count in enumerate(self.counts):
            if count > 0:
                self._step(i)
        self.counts = [0] * len(self.optimizers)
