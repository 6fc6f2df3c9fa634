"""Save FLUX.1: BFL single files (transformer, AE, CLIP-L, T5-XXL) or one Diffusers FLUX folder.

Every write goes through a temporary name and a rename; the in-memory models are never changed (the
save dtype is applied to copies).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import torch

from library.fileio import atomic_path

from .architectures import NORM_GROUPS_KEYS
from .checkpoint_io import save_state_dict
from .flux_bundle import FluxModels
from .flux_keys import flux_rules
from .key_rules import model_to_ldm
from .saving import _cast, save_part_folder
from .text_encoder_keys import hf_clip_rules
from .unet_keys import vae_rules

logger = logging.getLogger(__name__)

T5_TIED = "encoder.embed_tokens.weight"  # the same tensor as `shared.weight`; files store it once


def transformer_to_bfl(transformer: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = _cast(transformer.state_dict(), dtype)
    return model_to_ldm(sd, flux_rules({k: tuple(v.shape) for k, v in sd.items()}))


def ae_to_bfl(ae: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = _cast(ae.state_dict(), dtype)
    return model_to_ldm(sd, vae_rules(sd.keys(), ae.config))


def clip_l_to_file(clip_l: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = _cast(clip_l.state_dict(), dtype)
    return model_to_ldm(sd, hf_clip_rules(sd.keys()))  # `text_model.*` whatever transformers names it


def t5_to_file(t5: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _cast(t5.state_dict(), dtype).items() if k != T5_TIED}


def save_flux_transformer(transformer: torch.nn.Module, path: str, dtype: torch.dtype | None = None,
                          metadata: Mapping[str, str] | None = None) -> None:
    """BFL layout (``double_blocks.N.img_attn.qkv``, ...), as ``flux1-dev.safetensors``."""
    save_state_dict(transformer_to_bfl(transformer, dtype), path, metadata=metadata)
    logger.info("saved FLUX transformer %s", path)


def save_flux_ae(ae: torch.nn.Module, path: str, dtype: torch.dtype | None = None) -> None:
    groups = ae.config.norm_num_groups
    meta = {NORM_GROUPS_KEYS["vae"]: str(groups)} if groups != 32 else None
    save_state_dict(ae_to_bfl(ae, dtype), path, metadata=meta)


def save_clip_l(clip_l: torch.nn.Module, path: str, dtype: torch.dtype | None = None) -> None:
    save_state_dict(clip_l_to_file(clip_l, dtype), path)


def save_t5xxl(t5: torch.nn.Module, path: str, dtype: torch.dtype | None = None) -> None:
    save_state_dict(t5_to_file(t5, dtype), path)


def save_flux_files(models: FluxModels, paths: Mapping[str, str], dtype: torch.dtype | None = None) -> None:
    """Write the parts named in ``paths`` (keys transformer, ae, clip_l, t5xxl) as single files."""
    writers = {"transformer": save_flux_transformer, "ae": save_flux_ae, "clip_l": save_clip_l, "t5xxl": save_t5xxl}
    for part, path in paths.items():
        writers[part](getattr(models, part), path, dtype)


# ---------------------------------------------------------------- Diffusers folder

def default_scheduler_config(schnell: bool) -> dict:
    """The released FLUX.1 schedulers: dev shifts with the image size, schnell does not."""
    import diffusers  # start-up (diffusers: ~2 s)

    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": diffusers.__version__,
           "num_train_timesteps": 1000, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
           "max_image_seq_len": 4096}
    cfg.update(shift=1.0, use_dynamic_shifting=False) if schnell else cfg.update(shift=3.0, use_dynamic_shifting=True)
    return cfg


def _model_index() -> dict:
    import diffusers  # start-up (diffusers: ~2 s)

    return {
        "_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }


def save_flux_diffusers(models: FluxModels, folder: str, dtype: torch.dtype | None = None,
                        use_safetensors: bool = True) -> None:
    """transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/ (T5), tokenizer/, tokenizer_2/, scheduler/."""
    from .tokenizers import save_tokenizers  # start-up (imports transformers: ~1 s)

    with atomic_path(folder) as tmp:
        root = Path(tmp)
        for name, model in (("transformer", models.transformer), ("vae", models.ae)):
            save_part_folder(model, root / name, "diffusers", use_safetensors, _cast(model.state_dict(), dtype))
        save_part_folder(models.clip_l, root / "text_encoder", "transformers", use_safetensors,
                         clip_l_to_file(models.clip_l, dtype))
        save_part_folder(models.t5xxl, root / "text_encoder_2", "transformers", use_safetensors,
                         t5_to_file(models.t5xxl, dtype))
        save_tokenizers(models.tokenizers[:1], str(root))
        models.tokenizers[1].save_pretrained(str(root / "tokenizer_2"))
        (root / "scheduler").mkdir()
        sched = models.scheduler_config or default_scheduler_config(models.is_schnell)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2), encoding="utf-8")
        (root / "model_index.json").write_text(json.dumps(_model_index(), indent=2), encoding="utf-8")
    logger.info("saved FLUX.1 %s Diffusers folder %s", models.name, folder)
