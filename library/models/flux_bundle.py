"""The loaded model set of one FLUX.1 model: transformer, AE, CLIP-L, T5-XXL and their tokenizers."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .flux_config import model_name


@dataclass
class FluxModels:
    """FLUX.1 dev or schnell. ``tokenizers`` is [CLIP-L tokenizer, T5 tokenizer].

    ``scheduler_config``: the source Diffusers folder's scheduler, written back unchanged by a folder save
    (None: the released dev / schnell scheduler is written).
    """

    transformer: torch.nn.Module
    ae: torch.nn.Module
    clip_l: torch.nn.Module
    t5xxl: torch.nn.Module
    tokenizers: list = field(default_factory=list)
    source: str | None = None
    scheduler_config: dict | None = None

    family = "flux"

    @property
    def name(self) -> str:
        """"dev" (guidance-distilled, has ``guidance_in``) or "schnell"."""
        return model_name(self.transformer.config)

    @property
    def is_schnell(self) -> bool:
        return self.name == "schnell"

    def parts(self) -> list[tuple[str, torch.nn.Module]]:
        return [("transformer", self.transformer), ("ae", self.ae), ("clip_l", self.clip_l), ("t5xxl", self.t5xxl)]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FluxModels":
        for _, m in self.parts():
            m.to(device=device, dtype=dtype)
        return self
