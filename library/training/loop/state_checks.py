"""Checks of a ``--resume`` state folder before anything is restored, each failure one line naming the file.

A state saved with other settings (another ``--network_dim``, another network module) names the first
tensor that does not fit and both shapes; a damaged ``train_state.json`` is named as such; a missing RNG
file means the run could not continue exactly, which is an error unless ``--resume_inexact``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from safetensors import safe_open

from library.errors import UserError

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
_MODEL_FILE = "model{}.safetensors"  # accelerate's names: model.safetensors, model_1.safetensors, ...
_RNG_FILE = "random_states_{}.pkl"


def read_train_state(folder: str) -> Optional[dict]:
    """The parsed ``train_state.json`` (None when the folder has none: an sd-scripts v0.8 state)."""
    path = os.path.join(folder, TRAIN_STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        for key in ("global_step", "epoch", "current_step", "current_epoch"):
            if key in data and not isinstance(data[key], int):
                raise ValueError(f"{key} is {data[key]!r}, not a whole number")
        if "global_step" not in data and "current_step" not in data:
            raise ValueError("it has neither global_step nor current_step")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({_first_line(e)}); the state cannot "
                        "say where to continue: resume from another state folder") from None
    return data


def check_model_shapes(accelerator, folder: str) -> None:
    """Every saved tensor of every prepared model exists in the model with the same shape (and back)."""
    for i, model in enumerate(getattr(accelerator, "_models", [])):
        path = os.path.join(folder, _MODEL_FILE.format(f"_{i}" if i else ""))
        if not os.path.exists(path):
            continue  # a pickle (.bin) state or DeepSpeed: accelerate's own error applies
        try:
            with safe_open(path, "pt") as f:
                saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own type for a damaged file
            raise UserError(f"--resume {path}: cannot read this file ({_first_line(e)})") from None
        current = {k: list(v.shape) for k, v in model.state_dict().items()}
        for key in sorted(saved.keys() & current.keys()):
            if saved[key] != current[key]:
                raise UserError(f"--resume {folder}: tensor {key} has shape {saved[key]} in the state but "
                                f"{current[key]} in this run (the state was saved with other network settings, "
                                "e.g. another --network_dim)")
        missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
        if missing or unexpected:
            parts = [f"{len(missing)} tensors of this run are not in it (e.g. {missing[0]})"] if missing else []
            parts += [f"{len(unexpected)} of its tensors are not in this run (e.g. {unexpected[0]})"] if unexpected else []
            raise UserError(f"--resume {path}: the state does not fit this run: {'; '.join(parts)} (another "
                            "--network_module, network arguments, or which parts train?)")


def check_rng_file(process_index: int, folder: str, inexact: bool, warn: bool = True) -> None:
    """The RNG state of this process must be there: without it the resumed run would not be exact."""
    path = os.path.join(folder, _RNG_FILE.format(process_index))
    if os.path.exists(path) or (inexact and not warn):
        return
    if not inexact:
        raise UserError(f"--resume {folder}: {os.path.basename(path)} is missing, so the random number generators "
                        "cannot be restored and the run would not continue exactly as it would have; add "
                        "--resume_inexact to resume anyway")
    logger.warning("!!! --resume_inexact: %s is missing; the random number generators are NOT restored, the run "
                   "continues but will not match an uninterrupted run !!!", path)


def describe_load_failure(e: BaseException) -> str:
    """The informative line of accelerate's / torch's load error (torch puts the cause on the second line)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    for line in lines:
        if line.startswith(("size mismatch", "Missing key", "Unexpected key")):
            return line[:300]
    return (lines[0] if lines else type(e).__name__)[:200]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
