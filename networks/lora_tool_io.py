"""File handling shared by the LoRA tools (spec utilities §7-§11, file-formats §a.2, §b.2, §b.3).

Reading a LoRA with its header metadata, grouping tensors per module, precision names, input titles
for ``modelspec.merged_from``, and the one save path: cast to the save dtype first, then hash, then
write atomically, so ``sshs_*`` always describe the bytes in the file (fix of spec pitfall 6).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open

from library.errors import UserError
from library.formats.lora_io import is_safetensors, load_state_dict_file, save_state_dict_file

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_EXTENSIONS = (".ckpt", ".pt", ".pth", ".safetensors")

ModuleTensors = dict[str, torch.Tensor]  # "alpha", "lora_down.weight", "lora_up.weight"


def precision_dtype(name: str | None, option: str, default: torch.dtype | None = None) -> torch.dtype | None:
    """``float``/``fp16``/``bf16`` -> dtype; None -> ``default``; anything else names the option."""
    if name is None or name == "None":
        return default
    if name not in PRECISIONS:
        raise UserError(f"{option} {name!r}: expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Header metadata of a ``.safetensors`` file ({} for pickles or a header without metadata)."""
    if not is_safetensors(path):
        return {}

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise UserError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:200]})") from None


def read_lora(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, str]]:
    """Tensors (cast to ``dtype`` if given) and metadata of one LoRA file; not a LoRA -> ``UserError``."""
    sd = load_state_dict_file(path)
    if not any(k.endswith(".lora_down.weight") for k in sd):
        raise UserError(f"{path}: no '.lora_down.weight' tensors: not a kohya LoRA file")
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd, read_metadata(path)


def group_modules(sd: Mapping[str, torch.Tensor]) -> dict[str, ModuleTensors]:
    """``{module name: {"alpha"|"lora_down.weight"|"lora_up.weight": tensor}}`` in file order."""
    modules: dict[str, ModuleTensors] = {}
    for key, value in sd.items():
        name, _, rest = key.partition(".")
        modules.setdefault(name, {})[rest] = value
    return modules


def complete_modules(sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> dict[str, ModuleTensors]:
    """Modules that have both factors; a half module (down without up) is a corrupt file."""
    modules = group_modules(sd)
    for name, parts in modules.items():
        if ("lora_down.weight" in parts) != ("lora_up.weight" in parts):
            raise UserError(f"{path}: module {name} has only one of lora_down/lora_up")
    return {name: parts for name, parts in modules.items() if "lora_down.weight" in parts}


def module_alpha(parts: ModuleTensors) -> float | None:
    """The module's alpha as a float, None when the file has none (then alpha = rank, §a.2)."""
    alpha = parts.get("alpha")
    return None if alpha is None else float(alpha.float())


def model_title(path: str | os.PathLike) -> str:
    """A file's ``modelspec.title`` when it has one, else its stem (spec §b.3 ``merged_from``)."""
    title = read_metadata(path).get("modelspec.title") if os.path.isfile(path) and is_safetensors(path) else None
    return title if title else Path(path).stem


def merged_from(paths: Iterable[str | os.PathLike]) -> str:
    """``modelspec.merged_from``: titles of the inputs joined with ``", "`` (spec §b.3)."""
    return ", ".join(model_title(p) for p in paths)


def check_inputs_exist(paths: Iterable[str], option: str) -> None:
    """Every input file exists, checked before any work so a typo costs nothing."""
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{option}: no such file: {path}")


def check_lora_output(path: str | None, option: str = "--save_to") -> str:
    """The output name is given and has a LoRA extension (``.ckpt .pt .pth .safetensors``)."""
    if not path:
        raise UserError(f"{option} is required")
    if os.path.splitext(path)[1].lower() not in LORA_EXTENSIONS:
        raise UserError(f"{option} {path}: the file name must end with {', '.join(LORA_EXTENSIONS)}")
    return path


def save_lora(sd: Mapping[str, torch.Tensor], path: str, dtype: torch.dtype | None,
              metadata: Mapping[str, str] | None) -> dict[str, torch.Tensor]:
    """Cast every tensor (alpha too) to ``dtype``, then write with ``sshs_*`` of the cast tensors.

    sd-scripts v0.8.7 hashed before the cast (pitfall 6), so its hashes described another file.
    Returns the tensors as written.
    """
    out = {k: (v.detach().to("cpu", dtype) if dtype is not None else v.detach().to("cpu")).contiguous()
           for k, v in sd.items()}
    save_state_dict_file(out, path, metadata)
    return out


def check_device(name: str | None, option: str) -> None:
    """A device option names a device torch can use here (``cuda`` needs a CUDA build and a GPU)."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{option} {name!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} {name}: no CUDA device here (this torch build or machine has none)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option} {name}: no MPS device here")
