"""diffusers' / PEFT FLUX.1 LoRA files (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``) as
sd-scripts' FLUX LoRA state dict (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``), exactly.

A PEFT module adds ``s · B(A(x))`` with ``s`` = alpha / rank when the file carries ``<module>.alpha``, else 1
(what ``FluxPipeline.save_lora_weights`` writes). A layer of sd-scripts' format that diffusers splits
(``img_attn.qkv`` = ``to_q`` | ``to_k`` | ``to_v``) becomes one module: the parts' ``A`` stacked as its down
projection and their ``s · B`` placed block-diagonally in its up projection (alpha = that rank, so its scale is
1); parts sharing one ``A`` (what diffusers makes of a kohya file) keep it once. Parts the file lacks get zero rows.
"""
from __future__ import annotations

from typing import Mapping

import torch

from library.errors import UserError

from .lora_flux_targets import FluxTarget

_TRANSFORMER = "transformer."
_CLIP = "text_encoder."
_PEFT_PARTS = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".alpha": "alpha"}


def is_diffusers_format(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """PEFT keys (``….lora_A.weight``) rather than kohya keys (``….lora_down.weight``)."""
    return any(k.endswith(".lora_A.weight") for k in state_dict) and \
        not any(k.endswith(".lora_down.weight") for k in state_dict)


def diffusers_paths(targets: Mapping[str, FluxTarget], paths: Mapping[int, str]) -> dict[str, tuple[str, int]]:
    """diffusers module path as a LoRA file names it -> (kohya module name, part index).

    ``paths``: ``id(layer)`` -> file path (``transformer.…`` / ``text_encoder.…``) of every model layer."""
    found = {}
    for name, target in targets.items():
        for part, layer in enumerate(target.layers):
            if id(layer) in paths:
                found[paths[id(layer)]] = (name, part)
    return found


def layer_paths(text_encoders, transformer) -> dict[int, str]:
    """``id(layer)`` -> the path diffusers' FLUX LoRA files use for every Linear of CLIP-L and the transformer."""
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    found = {}
    for prefix, model in ((_TRANSFORMER, transformer), (_CLIP, encoders[0] if encoders else None)):
        if model is None:
            continue
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                found[id(module)] = prefix + path
    return found


def _split_key(key: str, where: str) -> tuple[str, str]:
    for part, kind in _PEFT_PARTS.items():
        if key.endswith(part):
            path = key[: -len(part)]
            if not path.startswith((_TRANSFORMER, _CLIP)):
                path = (_CLIP if path.startswith("text_model.") else _TRANSFORMER) + path  # bare PEFT keys
            return path, kind
    raise UserError(f"{where}: key {key!r} is neither sd-scripts' FLUX LoRA format nor diffusers' (lora_A / lora_B)")


def diffusers_to_kohya(state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, FluxTarget],
                       paths: Mapping[int, str], where: str) -> dict[str, torch.Tensor]:
    """The kohya state dict that adds exactly what the diffusers file adds; an unknown layer is a ``UserError``."""
    by_path = diffusers_paths(targets, paths)
    parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    unknown = []
    for key, value in state_dict.items():
        path, kind = _split_key(key, where)
        if path not in by_path:
            unknown.append(key)
            continue
        name, part = by_path[path]
        parts.setdefault(name, {}).setdefault(part, {})[kind] = value
    if unknown:
        raise UserError(f"{where}: {len(unknown)} tensors name no layer sd-scripts' FLUX.1 LoRA format has "
                        f"(e.g. {', '.join(unknown[:3])})")
    result: dict[str, torch.Tensor] = {}
    for name, found in parts.items():
        result.update(_module(name, targets[name], found, where))
    return result


def _module(name: str, target: FluxTarget, found: dict[int, dict[str, torch.Tensor]],
            where: str) -> dict[str, torch.Tensor]:
    downs, ups = [], []
    for part, tensors in sorted(found.items()):
        if "lora_A" not in tensors or "lora_B" not in tensors:
            raise UserError(f"{where}: module {name} part {part} lacks its lora_A or lora_B tensor")
        down, up = tensors["lora_A"].float(), tensors["lora_B"].float()
        layer = target.layers[part]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != layer.in_features or up.shape[0] != layer.out_features \
                or up.shape[1] != down.shape[0]:
            raise UserError(f"{where}: module {name} part {part}: lora_A {tuple(down.shape)} / lora_B "
                            f"{tuple(up.shape)} do not fit the model's layer ({layer.out_features}, "
                            f"{layer.in_features}): a LoRA for a model of other widths")
        rank = down.shape[0]
        scale = float(tensors["alpha"].float()) / rank if "alpha" in tensors else 1.0
        downs.append(down)
        ups.append((part, up * scale))
    if len(target.layers) == 1:
        down, (_, up) = downs[0], ups[0]
        return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                f"{name}.alpha": torch.tensor(float(down.shape[0]))}
    rows = [0]
    for layer in target.layers:
        rows.append(rows[-1] + layer.out_features)
    shared = len(downs) == len(target.layers) and all(torch.equal(d, downs[0]) for d in downs)
    down = downs[0] if shared else torch.cat(downs)
    up = torch.zeros(rows[-1], down.shape[0])
    col = 0
    for part, part_up in ups:
        width = part_up.shape[1]
        up[rows[part]: rows[part + 1], col: col + width] = part_up
        col = 0 if shared else col + width
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(float(down.shape[0]))}
