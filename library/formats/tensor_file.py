"""Tensor names, shapes and metadata of a ``.safetensors`` or ``.ckpt``/``.pt`` file, without its tensor data.

A safetensors header is parsed here (no tensor is read; a truncated or non-safetensors file is named as such);
``.ckpt``/``.pt`` pickles have no header and are loaded weights-only. Used to check a file before any model work
(``networks/lora_family.py``) and before loading LoRA weights (``lora_io.py``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from library.errors import UserError

Shape = tuple[int, ...]

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorFile:
    """Tensor names with their shapes, and the metadata, of one file (no tensor data)."""

    path: str
    shapes: dict[str, Shape]
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self) -> dict[str, dict[str, Shape]]:
        """``{module name: {"lora_down.weight"|"lora_up.weight"|"alpha"|…: shape}}`` of the LoRA keys."""
        out: dict[str, dict[str, Shape]] = {}
        for key, shape in self.shapes.items():
            name, _, rest = key.partition(".")
            if name.startswith("lora_"):
                out.setdefault(name, {})[rest] = shape
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _safetensors_shapes(path: str, where: str) -> TensorFile:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{where}: not a .safetensors file ({size} bytes, shorter than a header)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise UserError(f"{where}: not a .safetensors file, or truncated (its first 8 bytes announce a "
                            f"{n}-byte header, the file has {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{where}: not a .safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{where}: not a .safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    shapes: dict[str, Shape] = {}
    end = 0
    for key, info in header.items():
        try:
            shapes[key] = tuple(int(d) for d in info["shape"])
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise UserError(f"{where}: malformed .safetensors header entry {key!r}") from None
    if 8 + n + end > size:
        raise UserError(f"{where}: truncated .safetensors file (its tensors need {8 + n + end} bytes, the file has "
                        f"{size})")
    return TensorFile(path, shapes, {str(k): str(v) for k, v in dict(metadata).items()})


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = tuple(value.shape)
        elif isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _pickle_shapes(path: str, where: str) -> TensorFile:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch raise many types for a file that is not a tensor pickle
        raise UserError(f"{where}: not a readable .ckpt/.pt tensor file ({_first_line(e)})") from None
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: not a tensor file (holds a {type(data).__name__}, not a dict of tensors)")
    return TensorFile(path, _flatten(data))


def read_tensor_file(path: str | os.PathLike, option: str = "--network_weights") -> TensorFile:
    """Names and shapes of a ``.safetensors`` (header only) or ``.ckpt``/``.pt`` file; ``UserError`` naming
    ``option`` and the file when it is missing or unreadable."""
    path = str(path)
    where = f"{option} {path}"
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file")
    if path.lower().endswith(".safetensors"):
        return _safetensors_shapes(path, where)
    return _pickle_shapes(path, where)
