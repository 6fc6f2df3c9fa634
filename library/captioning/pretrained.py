"""Load a transformers captioning model from a local folder or a hub name, with offline-friendly errors.

Design "Offline by design": a local folder always works; a hub name works when online (or cached),
and otherwise fails with one line that says how to download the model into a folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, TypeVar

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else the user typed is a file-system path."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith((".pth", ".pt", ".ckpt", ".bin", ".safetensors")))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_pretrained(source: str, load: Callable[[str], T], option: str, example: str) -> T:
    """Call ``load(source)`` (e.g. processor + model ``from_pretrained``), turning failures into a UserError.

    ``option`` names the command-line option in the message; ``example`` is a hub id to download.
    """
    path = Path(source).expanduser()
    # `hf` is huggingface_hub's command line (older releases call it `huggingface-cli`)
    download_hint = (f"download it once, e.g. `hf download {example} --local-dir <folder>`, "
                     f"and pass {option} <folder>")
    if path.is_file():
        raise UserError(f"{option} {source}: is a file; expected a folder with a transformers-format model "
                        f"(config.json, model weights, processor files): {download_hint}")
    if path.is_dir():
        try:
            return load(str(path))
        except Exception as e:  # missing/garbled files raise OSError, ValueError, KeyError, ...
            raise UserError(f"{option} {source}: not a usable transformers model folder ({_first_line(e)})") from None
    if _looks_like_path(source):
        raise UserError(f"{option} {source}: no such folder")
    logger.info(f"loading {source} from the Hugging Face hub (or its local cache)")
    try:
        return load(source)
    except Exception as e:  # offline, unknown repo, gated repo, interrupted download
        if _hub_offline():
            raise UserError(f"{option} {source}: not in the local hub cache and hub access is off "
                            f"(HF_HUB_OFFLINE): {download_hint}") from None
        raise UserError(f"{option} {source}: cannot load it from the Hugging Face hub ({_first_line(e)}); "
                        f"if you are offline, {download_hint}") from None


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def default_device() -> torch.device:
    """CUDA when available, else CPU (sd-scripts' DEVICE)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
