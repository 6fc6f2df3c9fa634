"""The loaded model set of one Stable Diffusion checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SDModels:
    """U-Net, VAE, text encoder(s) and tokenizer(s) of one SD1 / SD2 / SDXL model.

    ``te_extras`` keeps the few LDM text-encoder tensors that the transformers model does not hold
    (SD2's unused last block and projection, OpenCLIP ``logit_scale``), keyed by full LDM name, so a
    file -> file conversion writes them back unchanged instead of faking them.
    """

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    v_parameterization: bool = False
    source: str | None = None
    te_extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def v2(self) -> bool:
        return self.family == "sd2"

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SDModels":
        for m in (self.unet, self.vae, *self.text_encoders):
            m.to(device=device, dtype=dtype)
        return self
