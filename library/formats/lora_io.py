"""Reading and writing LoRA state-dict files (spec file-formats §a.2 "Files", §b.2 hashes)."""
from __future__ import annotations

import os
from typing import Mapping

import safetensors.torch  # called through the module: fault-injection tests patch save_file there
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.fileio import atomic_path
from library.formats.model_hashes import precalculate_safetensors_hashes
from library.formats.tensor_file import read_tensor_file


def is_safetensors(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() == ".safetensors"


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.ckpt``/``.pt`` plain dict (weights-only load)."""
    if not os.path.isfile(path):
        raise UserError(f"network weights file not found: {path}")
    if is_safetensors(path):
        read_tensor_file(path, "network weights")  # a text or truncated file: one line naming it
    try:
        if is_safetensors(path):
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip raise many error types for a corrupt file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot read network weights {path}: {first}") from None


def save_state_dict_file(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                         metadata: Mapping[str, str] | None) -> None:
    """Write atomically; safetensors get ``metadata`` plus ``sshs_*`` of exactly the tensors written."""
    state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if is_safetensors(path):
            meta = dict(metadata or {})
            # hashed after any dtype cast, so they match the file's data region (pitfall 10)
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(state_dict, meta)
            safetensors.torch.save_file(state_dict, tmp, meta)
        else:
            torch.save(state_dict, tmp)  # .ckpt/.pt: a plain dict of tensors, no metadata


def save_network_weights(network: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype | None,
                         metadata: Mapping[str, str] | None) -> None:
    """A network plug-in's ``save_weights``: its state dict, cast to ``dtype`` if given, written atomically."""
    state_dict = network.state_dict()
    if dtype is not None:
        state_dict = {k: v.detach().clone().to("cpu").to(dtype) for k, v in state_dict.items()}
    save_state_dict_file(state_dict, path, metadata)
