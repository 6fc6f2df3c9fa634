"""Names of saved models and state folders, when to save and what to prune, spec file-formats §(e).

Pure functions. ``epoch`` everywhere means the number of *completed* epochs (the training loop's 0-based
epoch + 1), which is what file names, pruning and ``ss_epoch`` use at an epoch-end save.
"""
from __future__ import annotations

import math
from typing import Optional

# Defaults when --output_name is None (§e): each kind of save has its own.
DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_STEP_NAME = "at"
DEFAULT_LAST_NAME = "last"


def _name(output_name: Optional[str], default: str) -> str:
    # `is None`, not falsy, as upstream's default_if_none: an empty --output_name stays empty
    return default if output_name is None else output_name


def epoch_name(output_name: Optional[str], epoch: int) -> str:
    """``{name}-{epoch:06d}`` (no extension)."""
    return f"{_name(output_name, DEFAULT_EPOCH_NAME)}-{epoch:06d}"


def step_name(output_name: Optional[str], step: int) -> str:
    """``{name}-step{step:08d}`` (no extension)."""
    return f"{_name(output_name, DEFAULT_STEP_NAME)}-step{step:08d}"


def last_name(output_name: Optional[str]) -> str:
    """``{name}`` of the final save (no extension)."""
    return _name(output_name, DEFAULT_LAST_NAME)


def epoch_state_name(output_name: Optional[str], epoch: int) -> str:
    """``{name}-{epoch:06d}-state``."""
    return f"{epoch_name(output_name, epoch)}-state"


def step_state_name(output_name: Optional[str], step: int) -> str:
    """``{name}-step{step:08d}-state``."""
    return f"{step_name(output_name, step)}-state"


def last_state_name(output_name: Optional[str]) -> str:
    """``{name}-state`` of the state saved at the end of training."""
    return f"{last_name(output_name)}-state"


def model_extension(save_model_as: str) -> str:
    """File extension of a network / embedding save: ``"." + --save_model_as``."""
    return "." + save_model_as


def should_save_epoch(epoch: int, save_every_n_epochs: Optional[int], num_epochs: int) -> bool:
    """Epoch-end save after ``epoch`` completed epochs; never at the last epoch (the final save covers it)."""
    if not save_every_n_epochs:
        return False
    return epoch % save_every_n_epochs == 0 and epoch < num_epochs


def should_save_step(global_step: int, save_every_n_steps: Optional[int]) -> bool:
    """Step save when ``global_step % save_every_n_steps == 0``."""
    if not save_every_n_steps:
        return False
    return global_step % save_every_n_steps == 0


def epoch_to_remove(
    epoch: int,
    save_every_n_epochs: Optional[int],
    save_last_n_epochs: Optional[int],
    *,
    state: bool = False,
    save_last_n_epochs_state: Optional[int] = None,
) -> Optional[int]:
    """Epoch whose model (or, with ``state``, state folder) to delete after saving ``epoch``; None if none.

    ``e − save_every_n_epochs · keep``; ``keep`` is ``save_last_n_epochs_state`` for states when set.
    """
    keep = _keep(save_last_n_epochs, save_last_n_epochs_state if state else None)
    if keep is None or not save_every_n_epochs:
        return None
    remove = epoch - save_every_n_epochs * keep
    return remove if remove >= 0 else None


def step_to_remove(
    step: int,
    save_every_n_steps: Optional[int],
    save_last_n_steps: Optional[int],
    *,
    state: bool = False,
    save_last_n_steps_state: Optional[int] = None,
) -> Optional[int]:
    """Step whose model (or state folder) to delete after saving ``step``; None if none.

    ``r = s − keep − 1``, rounded down to a multiple of ``save_every_n_steps``; models: removed if ``r ≥ 0``,
    states: only if ``r > 0`` (upstream's two code paths differ here).
    """
    keep = _keep(save_last_n_steps, save_last_n_steps_state if state else None)
    if keep is None or not save_every_n_steps:
        return None
    remove = step - keep - 1
    remove -= remove % save_every_n_steps
    if remove < 0 or (state and remove == 0):
        return None
    return remove


def _keep(last_n: Optional[int], state_override: Optional[int]) -> Optional[int]:
    # upstream tests the override for truthiness, so `--save_last_n_*_state 0` falls back to the model value
    return state_override if state_override else last_n


def save_every_n_epochs_from_ratio(
    num_epochs: int, save_n_epoch_ratio: Optional[int], save_every_n_epochs: Optional[int]
) -> Optional[int]:
    """``--save_n_epoch_ratio N`` overrides save_every_n_epochs with ``floor(num_epochs / N) or 1``."""
    if save_n_epoch_ratio is not None and save_n_epoch_ratio > 0:
        return math.floor(num_epochs / save_n_epoch_ratio) or 1
    return save_every_n_epochs
