"""Reading and writing checkpoint files: safetensors, or pickles loaded weights-only.

Reading is lazy (shapes first, one tensor at a time) so that loading a model never holds the file's
tensors and the model's tensors at once; writing goes through a temporary name and a rename.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterator, Mapping

import safetensors.torch  # called through the module: fault-injection tests patch save_file there
import torch
from safetensors import safe_open

from library.errors import UserError
from library.fileio import atomic_path

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # .sft: BFL's first FLUX.1 releases (flux1-dev.sft, ae.sft)
_SD1_TE_OLD = "cond_stage_model.transformer."
_SD1_TE_NEW = "cond_stage_model.transformer.text_model."


class CheckpointReader:
    """Tensors of one checkpoint file, by name; ``shape`` reads only the header for safetensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        p = Path(path)
        if not p.exists():
            raise UserError(f"{self.path}: no such file")
        if p.is_dir():
            raise UserError(f"{self.path}: is a folder, expected a checkpoint file")
        self.metadata: dict[str, str] = {}
        self._st = None
        self._sd: dict[str, torch.Tensor] | None = None
        if p.suffix.lower() in SAFETENSORS_SUFFIXES:
            self._open_safetensors()
        else:
            self._open_pickle()
        self._alias = self._sd1_aliases()
        hidden = set(self._alias.values())
        self._visible = [k for k in self._keys if k not in hidden] + list(self._alias)

    def _open_safetensors(self) -> None:
        try:
            self._st = safe_open(self.path, framework="pt", device="cpu")
            self._keys = list(self._st.keys())
            self.metadata = self._st.metadata() or {}
        except Exception as e:  # safetensors raises several types for truncated/garbage files
            raise UserError(f"{self.path}: not a readable safetensors file ({_first_line(e)})") from None

    def _open_pickle(self) -> None:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=_is_zip(self.path))
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise UserError(
                    f"{self.path}: refused: this pickle needs code execution to load (it stores Python objects, "
                    "not just tensors); convert it to .safetensors with a tool you trust") from None
            raise UserError(f"{self.path}: not a checkpoint ({_first_line(e)})") from None
        except Exception as e:
            raise UserError(f"{self.path}: not a checkpoint ({_first_line(e)})") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            self.metadata = {k: str(v) for k, v in obj.items() if k in ("epoch", "global_step")}
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"{self.path}: not a checkpoint (expected a dict of tensors)")
        self._sd = obj
        self._keys = list(obj.keys())

    def _sd1_aliases(self) -> dict[str, str]:
        # some SD1 files lack `text_model.` in the TE keys (spec §f): expose them under the standard names
        alias = {}
        for k in self._keys:
            if k.startswith(_SD1_TE_OLD) and not k.startswith(_SD1_TE_NEW):
                alias[_SD1_TE_NEW + k[len(_SD1_TE_OLD):]] = k
        return alias

    def keys(self) -> list[str]:
        return list(self._visible)

    def __contains__(self, key: str) -> bool:
        return key in self._alias or key in self._keys

    def shape(self, key: str) -> tuple:
        key = self._alias.get(key, key)
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = self._alias.get(key, key)
        try:
            t = self._st.get_tensor(key) if self._st is not None else self._sd[key]
        except Exception as e:
            raise UserError(f"{self.path}: cannot read tensor {key!r} ({_first_line(e)}); is the file truncated?") from None
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def shapes(self, prefix: str = "") -> dict[str, tuple]:
        """Shapes of the tensors under ``prefix``, keyed without it."""
        return {k[len(prefix):]: self.shape(k) for k in self.keys() if k.startswith(prefix)}

    def items(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            if k.startswith(prefix):
                yield k, self.get(k)

    def close(self) -> None:
        self._st = None
        self._sd = None


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None, ckpt_extra: Mapping | None = None) -> None:
    """Write ``sd`` atomically: ``.safetensors`` by extension (with metadata), else ``torch.save``.

    ``ckpt_extra`` (e.g. epoch/global_step) wraps a pickle as ``{"state_dict": sd, **extra}``.
    """
    path = str(path)
    with atomic_path(path) as tmp:
        if path.lower().endswith(SAFETENSORS_SUFFIXES):
            safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=dict(metadata or {}))
        else:
            obj = {"state_dict": dict(sd), **ckpt_extra} if ckpt_extra is not None else dict(sd)
            torch.save(obj, tmp)
