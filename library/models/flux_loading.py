"""Load FLUX.1 from BFL single files (transformer + separate AE, CLIP-L, T5-XXL files) or a Diffusers folder.

Single files are built as SD files are (loading.py): configs from tensor shapes, the model on meta, each
tensor assigned already cast. The parts must fit together (latent channels, text widths); a mismatch, such
as an SDXL VAE given as ``--ae``, is one line naming the option, not a shape error deep in a forward pass.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from library.errors import UserError

from .checkpoint_io import CheckpointReader
from .flux_bundle import FluxModels
from .flux_config import bfl_prefix, infer_flux_config, infer_t5_config, model_name
from .flux_keys import flux_rules
from .flux_preflight import AE_PREFIXES, check_flux_parts
from .key_rules import KeyRule
from .loading import _build_text_encoder, _build_vae, _fill, _meta_model

logger = logging.getLogger(__name__)

FLUX_CLASS = "FluxTransformer2DModel"


def is_flux_folder(path: str) -> bool:
    cfg = Path(path) / "transformer" / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("_class_name") == FLUX_CLASS


def is_flux_file(path: str) -> bool:
    """True when ``path`` is a safetensors file holding a BFL FLUX transformer (header only)."""
    if Path(path).suffix.lower() != ".safetensors" or not os.path.isfile(path):
        return False
    reader = CheckpointReader(path)
    try:
        return bfl_prefix(reader.keys()) is not None
    finally:
        reader.close()


def is_flux(path: str) -> bool:
    return is_flux_folder(path) if os.path.isdir(path) else is_flux_file(path)


def _subfolder(path: str, sub: str, what: str, option: str) -> str | None:
    """The Diffusers subfolder of a model folder, None when ``path`` is the component's own folder."""
    if (Path(path) / sub / "config.json").is_file():
        return sub
    if (Path(path) / "config.json").is_file():
        return None
    raise UserError(f"{path}: {option}: neither a {what} folder (config.json) nor a model folder with {sub}/")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _from_folder(cls, path: str, sub: str, what: str, option: str, **kwargs):
    """``cls.from_pretrained`` on a model folder's ``sub/`` or on the part's own folder; errors name the option."""
    subfolder = _subfolder(path, sub, what, option)
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: {option}: cannot load the {what} ({_first_line(e)})") from None


# ---------------------------------------------------------------- one part each

def load_flux_transformer(path: str, dtype: torch.dtype = torch.float32, variant: str | None = None):
    """BFL single file (``flux1-dev.safetensors`` layout) or a Diffusers folder / its ``transformer/``."""
    from diffusers import FluxTransformer2DModel  # start-up (diffusers: ~2 s)

    if os.path.isdir(path):
        return _from_folder(FluxTransformer2DModel, path, "transformer", "FLUX transformer",
                            "--pretrained_model_name_or_path", torch_dtype=dtype, variant=variant)
    reader = CheckpointReader(path)
    prefix = bfl_prefix(reader.keys())
    if prefix is None:
        raise UserError(f"{path}: not a FLUX.1 transformer in the BFL layout (no double_blocks.0.img_attn.qkv.weight)")
    cfg = infer_flux_config(reader.shapes(prefix), path)
    logger.info("loading FLUX.1 %s transformer %s (%d double, %d single blocks)", model_name(cfg), path,
                cfg["num_layers"], cfg["num_single_layers"])
    model = _meta_model(lambda: FluxTransformer2DModel(**cfg))
    rules = flux_rules({k: tuple(v.shape) for k, v in model.state_dict().items()})
    used = _fill(model, rules, reader, prefix, dtype, "FLUX transformer")
    unused = [k for k in reader.keys() if k.startswith(prefix) and k not in used]
    if unused:
        logger.warning("%s: %d tensors are not part of the FLUX transformer and were skipped (first: %s)",
                       path, len(unused), unused[0])
    reader.close()
    return model


def load_flux_ae(path: str, dtype: torch.dtype = torch.float32):
    """``--ae``: BFL ``ae.safetensors`` (LDM VAE layout, 16 latent channels) or a Diffusers VAE / model folder."""
    from diffusers import AutoencoderKL  # start-up (diffusers: ~2 s)

    if os.path.isdir(path):
        return _from_folder(AutoencoderKL, path, "vae", "VAE", "--ae", torch_dtype=dtype)
    reader = CheckpointReader(path)
    keys = set(reader.keys())
    prefix = next((p for p in AE_PREFIXES if p + "encoder.down.0.block.0.conv1.weight" in keys), None)
    if prefix is None:
        raise UserError(f"{path}: --ae: not an autoencoder in the BFL / LDM layout")
    logger.info("loading FLUX AE %s", path)
    ae = _build_vae(reader, prefix, "flux", dtype)
    reader.close()
    return ae


def load_clip_l(path: str, dtype: torch.dtype = torch.float32):
    """``--clip_l``: a transformers-layout CLIP-L file (sd-scripts' ``clip_l.safetensors``) or folder."""
    from transformers import CLIPTextModel  # start-up (transformers: ~1 s)

    if os.path.isdir(path):
        return _from_folder(CLIPTextModel, path, "text_encoder", "CLIP text encoder", "--clip_l", dtype=dtype).eval()
    reader = CheckpointReader(path)
    if "text_model.embeddings.token_embedding.weight" not in reader:
        raise UserError(f"{path}: --clip_l: not a CLIP text encoder in the transformers layout (text_model.*)")
    logger.info("loading CLIP-L %s", path)
    te, _ = _build_text_encoder(reader, "", "hf", "sd1", dtype, with_projection=False)
    reader.close()
    return te


def load_t5xxl(path: str, dtype: torch.dtype = torch.float32):
    """``--t5xxl``: a transformers-layout T5 encoder file (``t5xxl_fp16.safetensors``) or folder."""
    from transformers import T5Config, T5EncoderModel  # start-up (transformers: ~1 s)

    if os.path.isdir(path):
        return _from_folder(T5EncoderModel, path, "text_encoder_2", "T5 encoder", "--t5xxl", dtype=dtype).eval()
    reader = CheckpointReader(path)
    cfg = T5Config(**infer_t5_config(reader.shapes(), f"{path}: --t5xxl"))
    logger.info("loading T5 encoder %s (%d layers, width %d)", path, cfg.num_layers, cfg.d_model)
    t5 = _meta_model(lambda: T5EncoderModel(cfg))
    # the input embedding is stored once, as `shared.weight` (HF saves drop the tied copy) or under both names
    emb = "encoder.embed_tokens.weight"
    present = "shared.weight" if "shared.weight" in reader else emb
    rules = [KeyRule((k,), present if k in ("shared.weight", emb) and k not in reader else k) for k in t5.state_dict()]
    _fill(t5, rules, reader, "", dtype, "T5 encoder")
    if "shared.weight" not in reader or emb not in reader:
        t5.encoder.embed_tokens.weight = t5.shared.weight  # one tensor, as the file has
    reader.close()
    return t5.eval()


# ---------------------------------------------------------------- the whole set

def load_flux_models(path: str, *, ae: str | None = None, clip_l: str | None = None, t5xxl: str | None = None,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     tokenizer_cache_dir: str | None = None, variant: str | None = None) -> FluxModels:
    """Transformer from ``path`` (BFL file or Diffusers folder); AE / CLIP-L / T5 from ``ae`` / ``clip_l`` /
    ``t5xxl`` when given, else from the Diffusers folder. A single file needs all three."""
    from .t5_tokenizer import load_t5_tokenizer  # start-up (imports transformers: ~1 s)
    from .tokenizers import load_tokenizers  # start-up (imports transformers: ~1 s)

    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder (--pretrained_model_name_or_path)")
    folder = path if os.path.isdir(path) else None
    if folder is None:
        missing = [o for o, v in (("--ae", ae), ("--clip_l", clip_l), ("--t5xxl", t5xxl)) if not v]
        if missing:
            raise UserError(f"{path}: a FLUX.1 single file holds only the transformer; give {', '.join(missing)}")
    for option, value in (("--ae", ae), ("--clip_l", clip_l), ("--t5xxl", t5xxl)):
        if value and not os.path.exists(value):
            raise UserError(f"{value}: no such file or folder ({option})")
    parts = {"ae": ae or folder, "clip_l": clip_l or folder, "t5xxl": t5xxl or folder}
    check_flux_parts(path, parts)  # headers and configs only: a wrong part is named before anything loads
    models = FluxModels(
        transformer=load_flux_transformer(path, dtype, variant),
        ae=load_flux_ae(parts["ae"], dtype),
        clip_l=load_clip_l(parts["clip_l"], dtype),
        t5xxl=load_t5xxl(parts["t5xxl"], dtype),
        source=path, scheduler_config=_folder_scheduler(folder))
    clip_tok = load_tokenizers("sd1", folder, tokenizer_cache_dir)[0]
    models.tokenizers = [clip_tok, load_t5_tokenizer(folder, t5xxl, tokenizer_cache_dir)]
    if str(device) != "cpu":
        models.to(device=device)
    return models


def _folder_scheduler(folder: str | None) -> dict | None:
    cfg = Path(folder) / "scheduler" / "scheduler_config.json" if folder else None
    return json.loads(cfg.read_text(encoding="utf-8")) if cfg and cfg.is_file() else None

