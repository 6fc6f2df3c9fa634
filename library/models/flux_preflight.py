"""FLUX.1 parts checked before any weight loads: each file is what its option says, and the parts fit.

Only safetensors headers and config.json files are read, so a wrong ``--ae`` (an SDXL VAE, say) is one
line naming the option in a second, not after the 24 GB transformer has loaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from library.errors import UserError

from .architectures import VAE_PREFIX
from .checkpoint_io import CheckpointReader
from .flux_config import bfl_prefix, infer_flux_config

AE_PREFIXES = ("", VAE_PREFIX, "vae.")
_AE_MARKER = "decoder.conv_in.weight"


def _folder_config(path: str, sub: str, option: str) -> Mapping:
    for folder in (Path(path) / sub, Path(path)):
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    raise UserError(f"{path}: {option}: neither a model folder with {sub}/ nor a folder with config.json")


def _header_shape(path: str, keys: tuple[str, ...], option: str, what: str) -> tuple:
    reader = CheckpointReader(path)
    try:
        key = next((k for k in keys if k in reader), None)
        if key is None:
            raise UserError(f"{path}: {option}: not {what} (no {keys[0]})")
        return reader.shape(key)
    finally:
        reader.close()


def transformer_config(path: str) -> Mapping:
    if os.path.isdir(path):
        return _folder_config(path, "transformer", "--pretrained_model_name_or_path")
    reader = CheckpointReader(path)
    try:
        prefix = bfl_prefix(reader.keys())
        if prefix is None:
            raise UserError(f"{path}: not a FLUX.1 transformer in the BFL layout (no double_blocks.0.img_attn.qkv.weight)")
        return infer_flux_config(reader.shapes(prefix), path)
    finally:
        reader.close()


def part_width(part: str, path: str) -> int:
    """AE latent channels, CLIP-L width or T5 width of ``path`` (file header or folder config)."""
    if part == "ae":
        if os.path.isdir(path):
            return _folder_config(path, "vae", "--ae")["latent_channels"]
        return _header_shape(path, tuple(p + _AE_MARKER for p in AE_PREFIXES), "--ae",
                             "an autoencoder in the BFL / LDM layout")[1]
    if part == "clip_l":
        if os.path.isdir(path):
            return _folder_config(path, "text_encoder", "--clip_l")["hidden_size"]
        return _header_shape(path, ("text_model.embeddings.token_embedding.weight",), "--clip_l",
                             "a CLIP text encoder in the transformers layout")[1]
    if os.path.isdir(path):
        return _folder_config(path, "text_encoder_2", "--t5xxl")["d_model"]
    return _header_shape(path, ("shared.weight", "encoder.embed_tokens.weight"), "--t5xxl",
                         "a T5 encoder in the transformers layout")[1]


def check_flux_parts(path: str, parts: Mapping[str, str]) -> dict:
    """The transformer config of ``path``, after checking that each of ``parts`` (ae / clip_l / t5xxl -> path)
    gives the widths it expects."""
    cfg = transformer_config(path)
    expected = {"ae": ("latent channels x 4 (2x2 patches)", cfg["in_channels"], 4),
                "clip_l": ("hidden width (pooled projection)", cfg["pooled_projection_dim"], 1),
                "t5xxl": ("width (joint attention)", cfg["joint_attention_dim"], 1)}
    for part, part_path in parts.items():
        what, want, factor = expected[part]
        got = part_width(part, part_path) * factor
        if got != want:
            raise UserError(f"--{part}: {what} is {got}, but this FLUX transformer expects {want}; "
                            f"is {part_path} the model's own file?")
    return dict(cfg)
