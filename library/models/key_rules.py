"""Key rules: how one Diffusers/transformers tensor relates to one original (LDM) tensor.

A conversion is a list of ``KeyRule``s built from the *model's own* key list, so the same table
serves both directions (spec file-formats §f) and a round trip is exact by construction:

* ``copy``      - same tensor, new name;
* ``conv1x1``   - Diffusers Linear (out, in) <-> LDM 1x1 conv (out, in, 1, 1) (VAE attention);
* ``squeeze``   - our Linear (out, in) <-> LDM tensor that may be (out, in) or (out, in, 1, 1); saved 2-D;
* ``transpose`` - HF ``text_projection.weight`` (P, D) <-> OpenCLIP ``text_projection`` (D, P);
* ``qkv``       - HF q/k/v projections <-> OpenCLIP packed ``in_proj_weight``/``in_proj_bias``;
* ``split``     - several model tensors of unequal rows <-> one concatenated tensor (FLUX ``linear1`` = q, k, v, mlp;
  the row counts travel in ``sizes``);
* ``swap``      - the two halves of the tensor exchanged (FLUX's final adaLN: BFL shift, scale; diffusers scale, shift).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

KINDS = ("copy", "conv1x1", "squeeze", "transpose", "qkv", "split", "swap")


@dataclass(frozen=True)
class KeyRule:
    """One LDM tensor and the model tensor(s) it becomes."""

    model_keys: tuple[str, ...]
    ldm_key: str
    kind: str = "copy"
    sizes: tuple[int, ...] = ()  # "split": rows of each model tensor, in model_keys order

    def to_model(self, ldm: torch.Tensor) -> list[torch.Tensor]:
        """LDM tensor -> model tensor(s), in ``model_keys`` order."""
        if self.kind == "copy":
            return [ldm]
        if self.kind in ("conv1x1", "squeeze"):
            return [ldm.reshape(ldm.shape[0], ldm.shape[1]) if ldm.ndim == 4 else ldm]
        if self.kind == "transpose":
            return [ldm.t().contiguous()]
        if self.kind == "qkv":
            # own storage for each: views of one packed tensor are "shared tensors" to safetensors, and
            # accelerate's save_state keeps only one of them (a state folder would lack q and v)
            return [t.clone() for t in ldm.chunk(3, dim=0)]
        if self.kind == "split":
            return [t.clone() for t in ldm.split(list(self.sizes), dim=0)]
        if self.kind == "swap":
            return [_swap_halves(ldm)]
        raise ValueError(self.kind)

    def to_ldm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Model tensor(s) -> LDM tensor."""
        if self.kind in ("copy", "squeeze"):
            return tensors[0]
        if self.kind == "conv1x1":
            t = tensors[0]
            return t.reshape(t.shape[0], t.shape[1], 1, 1) if t.ndim == 2 else t
        if self.kind == "transpose":
            return tensors[0].t().contiguous()
        if self.kind in ("qkv", "split"):
            return torch.cat(tensors, dim=0)
        if self.kind == "swap":
            return _swap_halves(tensors[0])
        raise ValueError(self.kind)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def rules_from_renamer(model_keys: Iterable[str], rename: Callable[[str], str | None],
                       kind_of: Callable[[str], str] = lambda k: "copy") -> list[KeyRule]:
    """One rule per model key, named by ``rename`` (keys it maps to None are skipped)."""
    rules = []
    for k in model_keys:
        ldm = rename(k)
        if ldm is not None:
            rules.append(KeyRule((k,), ldm, kind_of(k)))
    return rules


def check_bijective(rules: list[KeyRule]) -> None:
    """Two model keys must never land on one LDM key (a silent overwrite would corrupt a save)."""
    seen: dict[str, KeyRule] = {}
    for r in rules:
        if r.ldm_key in seen:
            raise AssertionError(f"conversion table maps {seen[r.ldm_key].model_keys} and {r.model_keys} to {r.ldm_key}")
        seen[r.ldm_key] = r


def model_to_ldm(model_sd: Mapping[str, torch.Tensor], rules: list[KeyRule], prefix: str = "") -> dict[str, torch.Tensor]:
    """Apply ``rules`` to a model state dict, producing LDM keys under ``prefix``."""
    return {prefix + r.ldm_key: r.to_ldm([model_sd[k] for k in r.model_keys]) for r in rules}
