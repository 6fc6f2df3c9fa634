"""Load SD1 / SD2 / SDXL from a Diffusers folder or a single LDM file (spec file-formats §f).

Single files: the family is detected from the keys and every size from tensor shapes; each model is
built with empty (meta) parameters and filled tensor by tensor, already in the target dtype, so the
peak is one model's weights, not the file's plus the model's.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights

from library.errors import UserError

from .architectures import (TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIX, detect_family, infer_text_config, infer_unet_config,
                            infer_vae_config, norm_groups)
from .bundle import SDModels
from .checkpoint_io import CheckpointReader
from .key_rules import KeyRule
from .text_encoder_keys import hf_clip_rules, open_clip_rules
from .unet_keys import unet_rules, vae_rules

logger = logging.getLogger(__name__)


def load_models(path: str, *, v2: bool = False, sdxl: bool | None = None, v_parameterization: bool = False,
                vae: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                tokenizer_cache_dir: str | None = None, variant: str | None = None) -> SDModels:
    """Load a whole model set.

    ``v2`` / ``sdxl`` state what the user said (sd-scripts' ``--v2`` / gen_img's ``--sdxl``); the family
    is still detected, and a contradiction is an error rather than a crash halfway through loading.
    """
    from .tokenizers import load_tokenizers  # start-up (imports transformers: ~1 s)

    if os.path.isfile(path):
        models = _load_single_file(path, dtype)
    elif os.path.isdir(path):
        models = _load_diffusers_folder(path, dtype, variant)
    else:
        raise UserError(f"{path}: no such file or folder (--pretrained_model_name_or_path / --ckpt)")
    check_family_flags(models.family, path, v2, sdxl)
    models.v_parameterization = v_parameterization
    models.tokenizers = load_tokenizers(models.family, path if os.path.isdir(path) else None, tokenizer_cache_dir)
    if vae:
        models.vae = load_vae(vae, models.family, dtype)
    if str(device) != "cpu":
        models.to(device=device)
    return models


def peek_family(path: str) -> str | None:
    """The model family of a checkpoint file or Diffusers folder from its header / configs only (no tensor is
    read); None for a legacy (non-zip) pickle, whose names cannot be listed without loading it whole."""
    if os.path.isdir(path):
        return _folder_family(Path(path))
    if Path(path).suffix.lower() != ".safetensors" and not _is_zip_file(path):
        return None
    reader = CheckpointReader(path)
    try:
        return detect_family(reader.keys(), path)
    finally:
        reader.close()


def _is_zip_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def check_family_flags(family: str, path: str, v2: bool, sdxl: bool | None) -> None:
    """``v2``: --v2 was given; ``sdxl``: True = an SDXL model is required (an sdxl_* script or --sdxl),
    False = an SD 1.x/2.x model is required, None = any."""
    if v2 and family != "sd2":
        raise UserError(f"{path}: --v2 was given but this is an {family.upper()} model")
    if sdxl and family != "sdxl":
        raise UserError(f"{path} is an {family.upper()} model, but this needs an SDXL model "
                        "(an sdxl_* script, or --sdxl)")
    if sdxl is False and family == "sdxl":
        raise UserError(f"{path}: this is an SDXL model; use the SDXL script / --sdxl")
    if family == "sd2" and not v2:
        logger.info("%s: detected an SD 2.x model (--v2 is implied)", path)


# ---------------------------------------------------------------- single file

def _load_single_file(path: str, dtype: torch.dtype) -> SDModels:
    reader = CheckpointReader(path)
    family = detect_family(reader.keys(), path)
    logger.info("loading %s checkpoint %s", family.upper(), path)
    unet = _build_unet(reader, family, dtype)
    vae = _build_vae(reader, VAE_PREFIX, family, dtype)
    tes, extras = [], {}
    for prefix, layout in TEXT_ENCODERS[family]:
        te, used = _build_text_encoder(reader, prefix, layout, family, dtype, with_projection=family == "sdxl" and layout == "open_clip")
        tes.append(te)
        extras.update({k: reader.get(k) for k in reader.keys()
                       if k.startswith(prefix) and k not in used and not k.endswith("position_ids")})
    reader.close()
    return SDModels(family, unet, vae, tes, [], source=path, te_extras=extras)


def _fill(model: torch.nn.Module, rules: list[KeyRule], reader: CheckpointReader, prefix: str,
          dtype: torch.dtype, what: str) -> set[str]:
    """Load every rule's tensors into ``model`` (built on meta); return the LDM keys consumed."""
    sd, used = {}, set()
    for r in rules:
        key = prefix + r.ldm_key
        if key not in reader:
            raise UserError(f"{reader.path}: missing tensor {key!r} ({what}); incomplete or unknown checkpoint layout")
        for mk, t in zip(r.model_keys, r.to_model(reader.get(key, dtype))):
            sd[mk] = t
        used.add(key)
    expected = dict(model.state_dict())
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise UserError(f"{reader.path}: tensor for {what} {k!r} has shape {tuple(t.shape)}, "
                            f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return used


def _meta_model(factory):
    # parameters on meta, buffers real (CLIP's position_ids is a non-persistent buffer)
    with init_empty_weights(include_buffers=False):
        return factory()


def _build_unet(reader: CheckpointReader, family: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel  # start-up (diffusers: ~2 s)

    try:
        cfg = infer_unet_config(reader.shapes(UNET_PREFIX), family)
        cfg["norm_num_groups"] = norm_groups(reader.metadata, "unet")
    except (KeyError, StopIteration, ZeroDivisionError) as e:
        raise UserError(f"{reader.path}: U-Net tensors do not have the SD layout (missing {e})") from None
    unet = _meta_model(lambda: UNet2DConditionModel(**cfg))
    _fill(unet, unet_rules(unet.state_dict().keys(), unet.config), reader, UNET_PREFIX, dtype, "U-Net")
    return unet


def _build_vae(reader: CheckpointReader, prefix: str, family: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL  # start-up (diffusers: ~2 s)

    try:
        cfg = infer_vae_config(reader.shapes(prefix), family)
        cfg["norm_num_groups"] = norm_groups(reader.metadata, "vae")
    except KeyError as e:
        raise UserError(f"{reader.path}: no VAE of the SD layout (missing {e})") from None
    vae = _meta_model(lambda: AutoencoderKL(**cfg))
    _fill(vae, vae_rules(vae.state_dict().keys(), vae.config), reader, prefix, dtype, "VAE")
    return vae


def _build_text_encoder(reader: CheckpointReader, prefix: str, layout: str, family: str, dtype: torch.dtype,
                        with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # start-up (transformers: ~1 s)

    try:
        cfg = CLIPTextConfig(**infer_text_config(reader.shapes(prefix), layout, family))
    except KeyError as e:
        raise UserError(f"{reader.path}: text encoder under {prefix!r} lacks {e}") from None
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    te = _meta_model(lambda: cls(cfg))
    keys = te.state_dict().keys()
    rules = hf_clip_rules(keys) if layout == "hf" else open_clip_rules(keys)
    used = _fill(te, rules, reader, prefix, dtype, "text encoder")
    te.eval()
    return te, used


# ---------------------------------------------------------------- Diffusers folder

def _load_diffusers_folder(path: str, dtype: torch.dtype, variant: str | None) -> SDModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # start-up (diffusers: ~2 s)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # start-up (transformers: ~1 s)

    root = Path(path)
    if not (root / "unet" / "config.json").exists():
        raise UserError(f"{path}: not a Diffusers model folder (no unet/config.json)")
    family = _folder_family(root)
    logger.info("loading %s Diffusers model %s", family.upper(), path)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, variant=variant)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, variant=variant)
        tes = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, variant=variant)]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype,
                                                                   variant=variant))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load Diffusers model ({str(e).splitlines()[0][:200]})") from None
    for te in tes:
        te.eval()
    return SDModels(family, unet, vae, tes, [], source=path)


def _folder_family(root: Path) -> str:
    if (root / "text_encoder_2").is_dir():
        return "sdxl"
    cfg_path = root / "text_encoder" / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{root}: Diffusers folder has no text_encoder/config.json")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # OpenAI CLIP (SD1) uses quick_gelu; OpenCLIP ViT-H (SD2) uses gelu
    return "sd2" if cfg.get("hidden_act") == "gelu" else "sd1"


# ---------------------------------------------------------------- VAE override

def load_vae(path: str, family: str, dtype: torch.dtype = torch.float32):
    """``--vae``: a Diffusers VAE folder (or a model folder with ``vae/``), or an LDM file (whole model or VAE only)."""
    from diffusers import AutoencoderKL  # start-up (diffusers: ~2 s)

    if os.path.isdir(path):
        sub = "vae" if (Path(path) / "vae" / "config.json").exists() else None
        if sub is None and not (Path(path) / "config.json").exists():
            raise UserError(f"{path}: --vae folder is neither a Diffusers VAE nor a model folder with vae/")
        try:
            return AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: --vae: cannot load a VAE ({str(e).splitlines()[0][:200]})") from None
    reader = CheckpointReader(path)
    keys = reader.keys()
    if any(k.startswith(VAE_PREFIX) for k in keys):
        prefix = VAE_PREFIX
    elif "encoder.down.0.block.0.conv1.weight" in keys:
        prefix = ""
    else:
        raise UserError(f"{path}: --vae: file has no VAE in the original (LDM) layout")
    logger.info("loading VAE %s", path)
    vae = _build_vae(reader, prefix, family, dtype)
    reader.close()
    return vae
