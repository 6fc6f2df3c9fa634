"""Saving models and training states on sd-scripts' schedule, names and pruning (spec file-formats §d, §e).

Model files and state folders are written under a temporary name and renamed, so a kill during a
save leaves every earlier file intact. A state folder holds what accelerate saves for the prepared
objects (only the trainable module, optimizer, scheduler, RNG states) plus ``train_state.json`` with
the exact data position, so ``--resume`` continues where the run stopped ([v0.9.0+] format, extended).
A failed save is one line naming the file, what went wrong and the last good checkpoint (exit code 2).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence

from PIL import Image

from library.errors import SaveError, UserError
from library.fileio import STAGING_SUFFIX, remove_path, replace_folder, save_errors
from library.interrupts import Interrupted
from library.training.extras.hub_upload import HubUploader, download_state
from library.training.loop import output_names as names
from library.training.loop.state_checks import (TRAIN_STATE_FILE, check_model_shapes, check_rng_file,
                                                describe_load_failure, read_train_state)
from library.training.settings import HubSettings, ResumeSettings, SaveSettings

logger = logging.getLogger(__name__)


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
    """accelerator.save_state into ``<folder>.saving``, then rename (all processes call this). On any failure,
    an interrupt included, the staging folder is removed and an earlier ``folder`` is left as it was."""
    staging = folder + STAGING_SUFFIX
    main = accelerator.is_main_process
    if main:
        remove_path(staging)
    accelerator.wait_for_everyone()
    try:
        with save_errors(folder, staging=staging):
            accelerator.save_state(staging)
            accelerator.wait_for_everyone()
            if main:
                for extra in extras:
                    extra.save_to_folder(staging)
                with open(os.path.join(staging, TRAIN_STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(state.to_json(), f, indent=2)
                replace_folder(staging, folder)
                logger.info("saved state %s", folder)
    except BaseException:
        if main:
            remove_path(staging)
        raise
    accelerator.wait_for_everyone()


def load_state(accelerator, folder: str, inexact: bool = False) -> TrainState:
    """``--resume``: check the folder fits this run, then restore the prepared objects and the data position."""
    if not os.path.isdir(folder):
        raise UserError(f"--resume {folder}: no such state folder")
    saved = read_train_state(folder)  # a damaged file fails here, before anything is restored
    check_model_shapes(accelerator, folder)
    check_rng_file(accelerator.process_index, folder, inexact)
    logger.info("resuming from %s", folder)
    try:
        accelerator.load_state(folder)
    except Exception as e:  # accelerate raises several types for foreign or partial folders
        raise UserError(f"--resume {folder}: cannot load this state ({describe_load_failure(e)})") from None
    if saved is None:
        logger.warning("%s has no %s (an sd-scripts v0.8 state): starting from step 0 with the restored "
                       "optimizer and scheduler, as sd-scripts does", folder, TRAIN_STATE_FILE)
        return TrainState()
    return TrainState.from_json(saved)


def resume_state(accelerator, resume: ResumeSettings, hub: HubSettings) -> tuple[TrainState, Optional[str]]:
    """The state ``--resume`` names (a fresh one without it) and the local folder it was read from (None
    without ``--resume``); with ``--resume_from_huggingface`` the folder is downloaded first."""
    if not resume.resume:
        return TrainState(), None
    folder = resume.resume
    if resume.from_huggingface:
        folder = download_state(resume.resume, hub.token)
        logger.info("resuming from hub state %s (downloaded to %s)", resume.resume, folder)
    return load_state(accelerator, folder, inexact=resume.inexact), folder


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old state %s", path)
    elif os.path.exists(path):
        os.remove(path)
        logger.info("removed old checkpoint %s", path)


class Checkpointer:
    """Decides when to save, names files, prunes old ones. ``save_model(path, event, epoch)`` writes one file.

    It remembers what it saved: a failed save names the last good checkpoint, an interrupt the last saved file.
    """

    def __init__(self, saving: SaveSettings, accelerator, save_model: Callable[[str, str, int, int], None],
                 ext: str, num_epochs: int, total_steps: Optional[int] = None, hub: Optional[HubSettings] = None):
        self.cfg, self.acc, self.save_model, self.ext = saving, accelerator, save_model, ext
        self.num_epochs = num_epochs
        self.total_steps = total_steps  # shown when interrupted
        self.out = saving.output_dir
        self.every_epochs = names.save_every_n_epochs_from_ratio(num_epochs, saving.save_n_epoch_ratio,
                                                                 saving.save_every_n_epochs)
        self.companions: list[Companion] = []  # written beside every model, pruned with it
        # run on every process before a model is saved: sharded training gathers the full weights there
        self.before_model_save: list[Callable[[], None]] = []
        self.state_extras: list[StateExtra] = []  # written into every state folder
        self.hub = None  # --huggingface_repo_id: uploads of saved models (and states), main process only
        self.last_model: Optional[str] = None  # the newest model file this run saved
        self.last_state: Optional[str] = None  # the newest state folder this run saved
        self.last_saved: Optional[str] = None  # the newer of the two
        self._state_step: Optional[int] = None  # the step of last_state
        if accelerator.is_main_process and hub is not None and hub.repo_id:  # no hub import otherwise

            self.hub = HubUploader.from_settings(hub)

    def _path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def _model(self, name: str, event: str, epoch: int, step: int) -> None:
        for collective in self.before_model_save:
            collective()
        if self.acc.is_main_process:
            path = self._path(name + self.ext)
            existed = os.path.exists(path)
            try:
                with save_errors(path):
                    os.makedirs(self.out, exist_ok=True)
                    self.save_model(path, event, epoch, step)
            except BaseException:
                if not existed:  # a plug-in network that writes in place may leave a partial file
                    remove_path(path)
                raise
            self.last_model = self.last_saved = path
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
        if self.last_model == self._path(name + self.ext):
            self.last_model = None

    def _save_state(self, folder: str, state: TrainState) -> None:
        save_state(self.acc, self._path(folder), state, self.state_extras)
        self.last_state = self.last_saved = self._path(folder)
        self._state_step = state.global_step
        if self.hub is not None and self.cfg.save_state_to_huggingface:
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
        a, step = self.cfg, state.global_step
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
        a = self.cfg
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
        with self.naming_last_good():
            self._model(model_name(key), event, loop_epoch, state.global_step)
            if self.cfg.save_state:
                self._save_state(state_name(key), state)
        if self.acc.is_main_process:
            if old_model is not None:
                self._remove_model(model_name(old_model))
            if old_state is not None:
                self._wait_upload(self._path(state_name(old_state)))
                _remove(self._path(state_name(old_state)))

    def at_end(self, state: TrainState) -> Optional[str]:
        a = self.cfg
        self.acc.wait_for_everyone()
        path = self._path(names.last_name(a.output_name) + self.ext)
        try:
            with self.naming_last_good():
                self._model(names.last_name(a.output_name), "final", self.num_epochs, state.global_step)
                if a.save_state or a.save_state_on_train_end:
                    self._save_state(names.last_state_name(a.output_name), state)
        except Interrupted as e:
            raise self.interrupted(e, state) from None
        return path

    # --- faults and interrupts -------------------------------------------------------------------
    def save_interrupt_state(self, state: TrainState) -> None:
        """After a graceful Ctrl-C: a resumable state of this step (unless the schedule just saved one)."""
        if self._state_step == state.global_step:
            return
        with self.naming_last_good():
            self._save_state(names.step_state_name(self.cfg.output_name, state.global_step), state)

    def interrupted(self, e: Interrupted, state: TrainState) -> Interrupted:
        """``e`` with the line the user sees: the step reached and the last file saved."""
        saved = f"last saved: {self.last_saved}" if self.last_saved else "nothing saved yet"
        total = self.total_steps or "?"
        return e.with_message(f"interrupted at step {state.global_step}/{total}; {saved}")

    @contextlib.contextmanager
    def naming_last_good(self) -> Iterator[None]:
        """A failed write inside the block also names the last good checkpoint (what the user still has)."""
        try:
            yield
        except SaveError as e:
            raise e.with_note(self.last_good()) from None

    def last_good(self) -> str:
        model = self.last_model or _newest_saved(self.out, self.cfg.output_name, self.ext)
        text = f"last good checkpoint: {model}" if model else "no checkpoint saved yet"
        return text + (f" (resumable state: {self.last_state})" if self.last_state else "")

    def write_samples(self, sample: Callable[[Optional[int], int], None], epoch: Optional[int], step: int) -> None:
        """Run the sample-image hook; on a failed write remove the half-written image and name it."""
        folder = os.path.join(self.out, "sample")
        before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        try:
            with save_errors(folder):
                sample(epoch, step)
        except BaseException as e:
            broken = _remove_broken_images(folder, before)
            if isinstance(e, SaveError) and broken:
                e = SaveError(f"cannot save {broken[0]}: {e.message.split(': ', 1)[-1]}", e.errno, broken[0])
            if isinstance(e, SaveError):
                raise e.with_note(self.last_good()) from None
            raise


def _newest_saved(folder: str, output_name: Optional[str], ext: str) -> Optional[str]:
    """The newest finished model of this output name in ``folder`` (saved by an earlier run, e.g. before a resume)."""
    last = names.last_name(output_name)
    pattern = re.compile(rf"^({re.escape(last)}|{re.escape(names.epoch_name(output_name, 0)[:-6])}\d{{6}}"
                         rf"|{re.escape(names.step_name(output_name, 0)[:-8])}\d{{8}}){re.escape(ext)}$")
    try:
        found = [os.path.join(folder, n) for n in os.listdir(folder) if pattern.match(n)]
    except OSError:
        return None
    found = [p for p in found if os.path.isfile(p) or os.path.isfile(os.path.join(p, "model_index.json"))]
    return max(found, key=os.path.getmtime) if found else None


def _remove_broken_images(folder: str, before: set[str]) -> list[str]:
    """Images that appeared in ``folder`` since ``before`` and do not decode (cut short by a failed write)."""
    broken = []
    for name in sorted(set(os.listdir(folder)) - before) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as im:
                im.load()
        except Exception:
            remove_path(path)
            broken.append(path)
    return broken
