"""Saving models and training states on sd-scripts' schedule, names and pruning (spec file-formats §d, §e).

Model files and state folders are written under a temporary name and renamed, so a kill during a
save leaves every earlier file intact. A state folder holds what accelerate saves for the prepared
objects (only the trainable module, optimizer, scheduler, RNG states) plus ``train_state.json`` with
the exact data position, so ``--resume`` continues where the run stopped ([v0.9.0+] format, extended).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Protocol, Sequence

from library.errors import UserError

from . import output_names as names

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where the run is: completed optimizer steps, current epoch (0-based) and batches taken in it."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def to_json(self) -> dict:
        # current_epoch / current_step are the keys later sd-scripts writes; the rest is ours
        return {"current_epoch": self.epoch, "current_step": self.global_step, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        if "global_step" in d:
            return cls(d["global_step"], d["epoch"], d.get("batches_in_epoch", 0))
        # a state folder of sd-scripts >= 0.9: step is "global step + 1", epoch 1-based, no data position
        return cls(max(0, d.get("current_step", 1) - 1), max(0, d.get("current_epoch", 1) - 1), 0)


class StateExtra(Protocol):
    """Something beyond accelerate's objects that a state folder carries (the EMA): ``ema.safetensors``."""

    def save_to_folder(self, folder: str) -> None: ...


class Companion(Protocol):
    """A file written beside every saved model (EMA weights, run receipt) and pruned with it."""

    def after_save(self, stem: str, ext: str, event: str, epoch: int, global_step: int) -> None: ...
    def paths(self, stem: str, ext: str) -> list[str]: ...


def save_state(accelerator, folder: str, state: TrainState, extras: Sequence[StateExtra] = ()) -> None:
    """accelerator.save_state into a temporary folder, then rename (all processes call this)."""
    tmp = folder + ".saving"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for extra in extras:
            extra.save_to_folder(tmp)
        with open(os.path.join(tmp, TRAIN_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state.to_json(), f, indent=2)
        if os.path.exists(folder):
            old = folder + ".old"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        logger.info("saved state %s", folder)
    accelerator.wait_for_everyone()


def load_state(accelerator, folder: str) -> TrainState:
    """``--resume``: restore the prepared objects and the data position."""
    if not os.path.isdir(folder):
        raise UserError(f"--resume {folder}: no such state folder")
    logger.info("resuming from %s", folder)
    try:
        accelerator.load_state(folder)
    except Exception as e:  # accelerate raises several types for foreign or partial folders
        raise UserError(f"--resume {folder}: cannot load this state ({str(e).splitlines()[0][:200]})") from None
    path = os.path.join(folder, TRAIN_STATE_FILE)
    if not os.path.exists(path):
        logger.warning("%s has no %s (an sd-scripts v0.8 state): starting from step 0 with the restored "
                       "optimizer and scheduler, as sd-scripts does", folder, TRAIN_STATE_FILE)
        return TrainState()
    with open(path, encoding="utf-8") as f:
        return TrainState.from_json(json.load(f))


def resume_state(accelerator, args: argparse.Namespace) -> TrainState:
    """The state ``--resume`` names (a fresh one without it); with ``--resume_from_huggingface`` the folder is
    downloaded first and ``args.resume`` becomes its local path (the EMA reads it later)."""
    if not getattr(args, "resume", None):
        return TrainState()
    if getattr(args, "resume_from_huggingface", False):
        from .hub_upload import download_state

        location = args.resume
        args.resume = download_state(args)
        logger.info("resuming from hub state %s (downloaded to %s)", location, args.resume)
    return load_state(accelerator, args.resume)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old state %s", path)
    elif os.path.exists(path):
        os.remove(path)
        logger.info("removed old checkpoint %s", path)


class Checkpointer:
    """Decides when to save, names files, prunes old ones. ``save_model(path, event, epoch)`` writes one file."""

    def __init__(self, args: argparse.Namespace, accelerator, save_model: Callable[[str, str, int, int], None],
                 ext: str, num_epochs: int):
        self.args, self.acc, self.save_model, self.ext, self.num_epochs = args, accelerator, save_model, ext, num_epochs
        self.out = args.output_dir or "."
        self.every_epochs = names.save_every_n_epochs_from_ratio(num_epochs, getattr(args, "save_n_epoch_ratio", None),
                                                                 args.save_every_n_epochs)
        self.companions: list[Companion] = []  # written beside every model, pruned with it
        self.state_extras: list[StateExtra] = []  # written into every state folder
        self.hub = None  # --huggingface_repo_id: uploads of saved models (and states), main process only
        if accelerator.is_main_process and getattr(args, "huggingface_repo_id", None):  # no hub import otherwise
            from .hub_upload import HubUploader

            self.hub = HubUploader.from_args(args)

    def _path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def _model(self, name: str, event: str, epoch: int, step: int) -> None:
        if self.acc.is_main_process:
            os.makedirs(self.out, exist_ok=True)
            self.save_model(self._path(name + self.ext), event, epoch, step)
            for companion in self.companions:
                companion.after_save(self._path(name), self.ext, event, epoch, step)
            if self.hub is not None:  # the final model is uploaded synchronously, as sd-scripts does
                self.hub.upload(self._path(name + self.ext), sync=event == "final")

    def _remove_model(self, name: str) -> None:
        self._wait_upload(self._path(name + self.ext))
        _remove(self._path(name + self.ext))
        for companion in self.companions:
            for path in companion.paths(self._path(name), self.ext):
                _remove(path)

    def _save_state(self, folder: str, state: TrainState) -> None:
        save_state(self.acc, self._path(folder), state, self.state_extras)
        if self.hub is not None and getattr(self.args, "save_state_to_huggingface", False):
            self.hub.upload(self._path(folder))

    def _wait_upload(self, path: str) -> None:
        """Never prune a file or state folder while its background upload is pending."""
        if self.hub is not None:
            self.hub.wait_for(path)

    def finish(self) -> None:
        """After the last save: wait for pending hub uploads."""
        if self.hub is not None:
            self.hub.close()

    def after_step(self, state: TrainState) -> None:
        a, step = self.args, state.global_step
        if not names.should_save_step(step, a.save_every_n_steps):
            return
        self._save_and_prune(
            state, "step", state.epoch, step, lambda k: names.step_name(a.output_name, k),
            lambda k: names.step_state_name(a.output_name, k),
            names.step_to_remove(step, a.save_every_n_steps, a.save_last_n_steps),
            names.step_to_remove(step, a.save_every_n_steps, a.save_last_n_steps, state=True,
                                 save_last_n_steps_state=a.save_last_n_steps_state))

    def after_epoch(self, epoch_done: int, state: TrainState) -> None:
        """``epoch_done`` = number of completed epochs (1-based)."""
        a = self.args
        if not names.should_save_epoch(epoch_done, self.every_epochs, self.num_epochs):
            return
        self._save_and_prune(
            state, "epoch", epoch_done - 1, epoch_done, lambda k: names.epoch_name(a.output_name, k),
            lambda k: names.epoch_state_name(a.output_name, k),
            names.epoch_to_remove(epoch_done, self.every_epochs, a.save_last_n_epochs),
            names.epoch_to_remove(epoch_done, self.every_epochs, a.save_last_n_epochs, state=True,
                                  save_last_n_epochs_state=a.save_last_n_epochs_state))

    def _save_and_prune(self, state: TrainState, event: str, loop_epoch: int, key: int,
                        model_name: Callable[[int], str], state_name: Callable[[int], str],
                        old_model: Optional[int], old_state: Optional[int]) -> None:
        """Save the model (and state) named by ``key``, then remove the ones the keep-last rules drop (§e)."""
        self.acc.wait_for_everyone()
        self._model(model_name(key), event, loop_epoch, state.global_step)
        if self.args.save_state:
            self._save_state(state_name(key), state)
        if self.acc.is_main_process:
            if old_model is not None:
                self._remove_model(model_name(old_model))
            if old_state is not None:
                self._wait_upload(self._path(state_name(old_state)))
                _remove(self._path(state_name(old_state)))

    def at_end(self, state: TrainState) -> Optional[str]:
        a = self.args
        self.acc.wait_for_everyone()
        path = self._path(names.last_name(a.output_name) + self.ext)
        self._model(names.last_name(a.output_name), "final", self.num_epochs, state.global_step)
        if a.save_state or getattr(a, "save_state_on_train_end", False):
            self._save_state(names.last_state_name(a.output_name), state)
        return path
