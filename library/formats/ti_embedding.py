"""Textual Inversion embedding files (read + write), spec file-formats §(c).

SD1/SD2 files hold ``{"emb_params": T[n, d]}``, SDXL files ``{"clip_l": T[n, 768], "clip_g": T[n, 1280]}``;
``.safetensors`` carry modelspec metadata, ``.pt``/``.ckpt`` are ``torch.save`` of the same dict (which A1111
and diffusers read as a single-tensor dict, pitfall 8).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import safetensors.torch  # called through the module: fault-injection tests patch save_file there
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.fileio import atomic_path

SD_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")


def embedding_state_dict(vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The SD1/SD2 file content ``{"emb_params": T[n, d]}``."""
    return {SD_KEY: vectors}


def sdxl_embedding_state_dict(clip_l: torch.Tensor, clip_g: torch.Tensor) -> dict[str, torch.Tensor]:
    """The SDXL file content ``{"clip_l": T[n, 768], "clip_g": T[n, 1280]}``."""
    return {"clip_l": clip_l, "clip_g": clip_g}


def save_embedding_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, str]] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Write an embedding dict atomically: safetensors (with ``metadata``) by extension, else ``torch.save``.

    ``dtype`` is ``--save_precision`` when given; None keeps each tensor's own dtype (§c).
    """
    out = {k: _to_save(v, dtype) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if str(path).endswith(".safetensors"):
            safetensors.torch.save_file(out, tmp, metadata=dict(metadata) if metadata else None)
        else:
            # no metadata here: upstream's .pt/.ckpt is the bare dict (modelspec is safetensors-only)
            torch.save(out, tmp)


def _to_save(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dtype is not None:
        t = t.to(dtype)
    return t.clone(memory_format=torch.contiguous_format)  # own storage: safetensors refuses shared or non-contiguous tensors


def read_embedding_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor dict of an embedding file; an A1111 ``string_to_param`` file gives its inner dict.

    Raises ``UserError`` naming the file when it is missing, unreadable, or holds no tensors.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"embedding file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            data = load_file(path)
        else:
            # weights_only: an embedding file must never run code; A1111 .pt files load fine this way
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / pickle raise many error types for a corrupt file
        raise UserError(f"{path} is not a readable embedding file: {e}") from e
    if isinstance(data, dict) and "string_to_param" in data:
        data = data["string_to_param"]
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} is not an embedding file: expected a dict of tensors")
    # non-tensor entries are skipped (upstream errors when the first value is not a tensor)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} is not an embedding file: it holds no tensor")
    return tensors


def load_embedding(path: str | os.PathLike, for_trainer: bool = False) -> torch.Tensor:
    """SD1/SD2 vectors: the **first** tensor of the file (§c).

    ``for_trainer=True`` (the trainer's ``--weights``) turns a 1-D tensor into (1, d); generation keeps it
    as is and reads ``size(0)`` as the vector count.
    """
    data = read_embedding_file(path)
    first = next(iter(data.values()))
    return _as_rows(first, path) if for_trainer else first


def load_sdxl_embedding(
    path: str | os.PathLike, for_trainer: bool = False
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """SDXL ``(clip_l, clip_g)``; either may be None, not both (§c)."""
    data = read_embedding_file(path)
    clip_l, clip_g = data.get("clip_l"), data.get("clip_g")
    if clip_l is None and clip_g is None:
        raise UserError(f"{path} is not an SDXL embedding file: it has neither 'clip_l' nor 'clip_g'")
    if for_trainer:
        clip_l = None if clip_l is None else _as_rows(clip_l, path)
        clip_g = None if clip_g is None else _as_rows(clip_g, path)
    return clip_l, clip_g


def _as_rows(t: torch.Tensor, path: str | os.PathLike) -> torch.Tensor:
    """(d,) → (1, d); (n, d) as is; anything else is not an embedding."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() != 2:
        raise UserError(f"{path}: embedding tensor has shape {tuple(t.shape)}; expected (num_vectors, dim)")
    return t
