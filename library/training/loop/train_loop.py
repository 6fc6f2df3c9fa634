"""THE training loop, shared by every trainer: the method object is the only per-trainer part.

    for each epoch:  for each batch:  loss = method.loss(batch)  ->  backward  ->  check  ->  step  ->  after_step
Accumulation, clipping, logging, sample images, saving, validation, the non-finite guard, the EMA
(through ``hooks.after_step``), the throughput watch and stopping are the same for everyone.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol

import torch
from tqdm.auto import tqdm

from library import interrupts
from library.training.loop.checkpointing import Checkpointer, TrainState
from library.training.loop.nonfinite_guard import NonFiniteGuard, group_grad_norms
from library.training.loop.throughput import ThroughputWatch, batch_images
from library.training.objective.diffusion_step import StepRandom
from library.training.settings import LoopPlan, LoopSettings

logger = logging.getLogger(__name__)


class TrainingMethod(Protocol):
    """What differs between trainers (style-examples "Applied" §1)."""

    module: torch.nn.Module  # the prepared trainable module (accumulation context)
    # optional: ``modules`` (all prepared trainable modules, e.g. U-Net and text encoder, for the
    # accumulation context) and ``loss_log_keys`` (names of the current / average loss; None skips one)

    def loss(self, batch: dict, rand: StepRandom) -> torch.Tensor: ...
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]: ...
    def lr_log_names(self, n_groups: int) -> list[str]: ...
    def on_epoch_start(self, epoch: int) -> None: ...
    def after_optimizer_step(self, state: TrainState) -> dict: ...


class LossRecorder:
    """Moving average over the current epoch's positions (sd-scripts' LossRecorder, spec losses §10)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.total = 0.0

    def add(self, epoch: int, step: int, loss: float) -> None:
        if epoch == 0 or step >= len(self.losses):
            self.losses.append(loss)
        else:
            self.total -= self.losses[step]
            self.losses[step] = loss
        self.total += loss

    @property
    def moving_average(self) -> float:
        return self.total / max(1, len(self.losses))


@dataclass
class LoopHooks:
    """Optional side jobs: sample images, extra logs. ``sample(epoch_or_None, global_step)``.

    ``after_step``: called after every optimizer step with the global step, returns logs (the EMA).
    ``validation``: a :class:`~library.training.extras.validation.Validator` (or None), run when it is due.
    """

    sample: Optional[Callable[[Optional[int], int], None]] = None
    on_log: list[Callable[[dict, int], None]] = field(default_factory=list)
    after_step: list[Callable[[int], dict]] = field(default_factory=list)
    validation: Optional[object] = None


def train(accelerator, method: TrainingMethod, make_loader: Callable[[int, int], Iterable], set_epoch: Callable[[int], None],
          optimizer, lr_scheduler, plan: LoopPlan, checkpointer: Checkpointer, settings: LoopSettings,
          state: TrainState, hooks: LoopHooks = LoopHooks()) -> TrainState:
    """Run until ``plan.max_train_steps`` optimizer steps. ``make_loader(epoch, skip)`` yields batches.

    Ctrl-C / SIGTERM end the run with :class:`~library.interrupts.Interrupted` naming the step and the last
    saved file. With ``--save_state`` (one process) the first Ctrl-C lets the current optimizer step finish,
    saves a resumable state of it and then stops; a second one stops at once.
    """
    graceful = settings.save_state and accelerator.num_processes == 1
    bar = tqdm(total=plan.max_train_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
               desc="steps", smoothing=0)
    try:
        with interrupts.graceful_stop(graceful):
            _train(accelerator, method, make_loader, set_epoch, optimizer, lr_scheduler, plan, checkpointer,
                   settings, state, hooks, bar)
            if interrupts.stop_requested():
                logger.info("Ctrl-C during the last step: the run ends with its final save")
    except interrupts.Interrupted as e:
        raise checkpointer.interrupted(e, state) from None
    finally:
        bar.close()  # the stop line starts on a line of its own
    return state


def _train(accelerator, method: TrainingMethod, make_loader: Callable[[int, int], Iterable],
           set_epoch: Callable[[int], None], optimizer, lr_scheduler, plan: LoopPlan, checkpointer: Checkpointer,
           settings: LoopSettings, state: TrainState, hooks: LoopHooks, bar) -> None:
    # 1. guards, sampling before the first step
    if hooks.sample and settings.sample_at_first and state.global_step == 0:
        checkpointer.write_samples(hooks.sample, 0, 0)
    recorder = LossRecorder()
    guard = NonFiniteGuard(settings.check_grads, getattr(accelerator, "scaler", None) is not None,
                           remedies=settings.remedies)
    watch = ThroughputWatch()
    seed, rank = settings.seed, accelerator.process_index
    ctx = _Loop(accelerator, method, optimizer, lr_scheduler, plan, checkpointer, settings, state, hooks, bar,
                recorder, watch)
    # 2. epochs
    for epoch in range(state.epoch, plan.num_epochs):
        if state.global_step >= plan.max_train_steps:
            break
        state.epoch = epoch
        set_epoch(epoch + 1)  # sd-scripts' datasets count epochs from 1
        method.on_epoch_start(epoch)
        skip = state.batches_in_epoch
        watch.mark()
        for i, batch in enumerate(watch.batches(make_loader(epoch, skip)), start=skip):
            # 3. one micro-step: forward + backward + one checked sync; accelerate steps the optimizer on sync
            rand = StepRandom.for_step(seed, state.global_step, i % plan.grad_accum, rank, accelerator.device)
            watch.add_images(batch_images(batch) * accelerator.num_processes)
            # the last, possibly partial, accumulation group of an epoch steps too (sd-scripts' prepared
            # loader tells accelerate where an epoch ends; ours is not prepared, so we decide here)
            sync = (i + 1) % plan.grad_accum == 0 or i + 1 == plan.batches_per_epoch
            with _no_sync_unless(accelerator, getattr(method, "modules", (method.module,)), sync):
                current, grad_logs = _forward_backward(accelerator, method, optimizer, batch, rand, guard,
                                                       state.global_step + 1, sync)
            if sync:
                # fused optimizer steps (optim/fused_backward.py) clipped and stepped inside backward already
                if settings.max_grad_norm and not getattr(optimizer, "steps_in_backward", False):
                    accelerator.clip_grad_norm_(list(method.trainable_parameters()), settings.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch = i + 1
            recorder.add(epoch, i, current)
            if not sync:
                continue
            # 4. after an optimizer step: bookkeeping, logs, samples, saves, validation
            state.global_step += 1
            if _after_optimizer_step(ctx, current, grad_logs):
                break
            watch.mark()
        # 5. end of epoch
        _end_of_epoch(ctx, epoch)


@dataclass
class _Loop:
    """What the parts of one training run's loop share."""

    accelerator: object
    method: TrainingMethod
    optimizer: object
    lr_scheduler: object
    plan: LoopPlan
    checkpointer: Checkpointer
    settings: LoopSettings
    state: TrainState
    hooks: LoopHooks
    bar: object
    recorder: LossRecorder
    watch: ThroughputWatch


def _after_optimizer_step(ctx: _Loop, current: float, grad_logs: dict) -> bool:
    """Logs, validation, samples and saves after optimizer step ``state.global_step``; True when the run
    has reached its last step."""
    state, hooks, settings, method = ctx.state, ctx.hooks, ctx.settings, ctx.method
    _warn_once(ctx.watch.step_done())
    ctx.bar.update(1)
    logs = _loss_logs(method, current, ctx.recorder.moving_average)
    logs.update(method.after_optimizer_step(state))
    for fn in hooks.after_step:
        logs.update(fn(state.global_step))
    logs.update(grad_logs)
    logs.update(_lr_logs(method, ctx.lr_scheduler, ctx.optimizer))
    if hooks.validation is not None and hooks.validation.due_after_step(state.global_step):
        logs.update(hooks.validation.run(method))
    ctx.bar.set_postfix(_postfix(ctx.recorder, hooks, ctx.watch))
    ctx.accelerator.log(logs, step=state.global_step)
    for fn in hooks.on_log:
        fn(logs, state.global_step)
    if hooks.sample and settings.sample_every_n_steps and not settings.sample_every_n_epochs \
            and state.global_step % settings.sample_every_n_steps == 0:
        ctx.checkpointer.write_samples(hooks.sample, None, state.global_step)
    ctx.checkpointer.after_step(state)
    if state.global_step >= ctx.plan.max_train_steps:
        return True
    if interrupts.stop_requested():  # a graceful Ctrl-C: this step is done, keep it resumable
        ctx.checkpointer.save_interrupt_state(state)
        raise interrupts.stop_now()
    return False


def _end_of_epoch(ctx: _Loop, epoch: int) -> None:
    """Epoch loss, and for a finished epoch its validation, saves and samples."""
    state, hooks, settings = ctx.state, ctx.hooks, ctx.settings
    ctx.accelerator.log({"loss/epoch": ctx.recorder.moving_average}, step=epoch + 1)
    if state.batches_in_epoch >= ctx.plan.batches_per_epoch:
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        if hooks.validation is not None and hooks.validation.due_after_epoch(epoch + 1):
            val_logs = hooks.validation.run(ctx.method)
            ctx.accelerator.log(val_logs, step=state.global_step)
            ctx.bar.set_postfix(_postfix(ctx.recorder, hooks, ctx.watch))
            for fn in hooks.on_log:
                fn(val_logs, state.global_step)
        ctx.checkpointer.after_epoch(epoch + 1, state)
        if hooks.sample and settings.sample_every_n_epochs and (epoch + 1) % settings.sample_every_n_epochs == 0:
            ctx.checkpointer.write_samples(hooks.sample, epoch + 1, state.global_step)
    if interrupts.stop_requested() and state.global_step < ctx.plan.max_train_steps:  # Ctrl-C during epoch-end jobs
        ctx.checkpointer.save_interrupt_state(state)
        raise interrupts.stop_now()


@contextlib.contextmanager
def _no_sync_unless(accelerator, modules, sync: bool):
    """DDP gradient all-reduce only on the micro-step that completes an accumulation group."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for m in modules:
                stack.enter_context(accelerator.no_sync(m))
        yield


def _forward_backward(accelerator, method: TrainingMethod, optimizer, batch: dict, rand: StepRandom,
                      guard: NonFiniteGuard, step: int, sync: bool) -> tuple[float, dict]:
    """Loss, backward, gradient sync; then the micro-step's single device sync: the loss value, the
    non-finite flags of the forward's sites and (``--check_grads``) the groups' gradient norms, checked
    before the optimizer may step (raises :class:`~library.errors.NonFiniteError`)."""
    with guard.recording():
        loss = method.loss(batch, rand)
    if getattr(optimizer, "steps_in_backward", False):
        # the weights change during backward: a non-finite loss must stop the run before it, not after
        checked = guard.check(loss, step)
        accelerator.backward(loss)
        return checked
    accelerator.backward(loss)  # divided by gradient_accumulation_steps, as sd-scripts' accumulation does
    norms, names = [], []
    if sync:
        if accelerator.num_processes > 1 and getattr(method, "manual_grad_sync", False):
            _all_reduce_grads(accelerator, method.trainable_parameters())
        if guard.check_grads:
            norms = group_grad_norms(optimizer.param_groups)
            names = _group_names(method.lr_log_names(len(norms)))
    return guard.check(loss, step, norms, names)


def _group_names(lr_names: list[str]) -> list[str]:
    """``lr/unet`` -> ``unet``; a bare ``lr`` (one group) -> ``group0``."""
    return [n[3:] if n.startswith("lr/") else f"group{i}" for i, n in enumerate(lr_names)]


def _postfix(recorder: LossRecorder, hooks: LoopHooks, watch: ThroughputWatch) -> dict:
    postfix = {"avr_loss": f"{recorder.moving_average:.4f}"}
    last = getattr(hooks.validation, "last", None)
    if last is not None:
        postfix["val_loss"] = f"{last:.4f}"
    postfix["img/s"] = f"{watch.images_per_second:.2f}"
    return postfix


def _warn_once(message: Optional[str]) -> None:
    if message:
        logger.warning(message)


def _all_reduce_grads(accelerator, params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of the gradients over processes. Networks patch the U-Net instead of being called through
    their DDP wrapper, so DDP never syncs them (sd-scripts all-reduces by hand too, spec losses §8)."""
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


def _loss_logs(method: TrainingMethod, current: float, average: float) -> dict:
    """N/X log ``loss/current`` and ``loss/average``; D/F/T log only ``loss`` (spec cli-options §13)."""
    current_key, average_key = getattr(method, "loss_log_keys", ("loss/current", "loss/average"))
    logs = {current_key: current} if current_key else {}
    if average_key:
        logs[average_key] = average
    return logs


def _lr_logs(method: TrainingMethod, lr_scheduler, optimizer) -> dict:
    lrs = lr_scheduler.get_last_lr()
    logs = {name: float(lr) for name, lr in zip(method.lr_log_names(len(lrs)), lrs)}
    group0 = optimizer.param_groups[0]
    if "d" in group0:  # D-Adaptation / Prodigy: the effective LR is d * lr
        logs["lr/d*lr"] = float(group0["d"] * group0["lr"])
    return logs
