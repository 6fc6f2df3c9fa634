"""Save a model set as one LDM checkpoint file or as a Diffusers folder (spec file-formats §f).

Both writers go through a temporary name and a rename, and never change the in-memory models
(the save dtype is applied to copies of the tensors), so trainers can save mid-run.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Mapping

import safetensors.torch  # called through the module: fault-injection tests patch save_file there
import torch

from library.errors import UserError
from library.fileio import atomic_path

from .architectures import NORM_GROUPS_KEYS, TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIX
from .bundle import SDModels
from .checkpoint_io import save_state_dict
from .key_rules import model_to_ldm
from .text_encoder_keys import hf_clip_rules, open_clip_rules
from .unet_keys import unet_rules, vae_rules

logger = logging.getLogger(__name__)

OPENCLIP_LOGIT_SCALE = 4.6052  # ln(100): the trained value in SD2 / SDXL files


def _cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point() and v.dtype != dtype:
            v = v.to(dtype)
        out[k] = v.to("cpu")
    return out


def text_encoder_to_ldm(models: SDModels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """LDM tensors of every text encoder, with the tensors transformers does not hold put back or faked."""
    out: dict[str, torch.Tensor] = {}
    for (prefix, layout), te in zip(TEXT_ENCODERS[models.family], models.text_encoders):
        sd = _cast(te.state_dict(), dtype)
        rules = hf_clip_rules(sd.keys()) if layout == "hf" else open_clip_rules(sd.keys())
        out.update(model_to_ldm(sd, rules, prefix))
        if layout == "hf":
            n_pos = te.config.max_position_embeddings
            out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
        else:
            out.update(_open_clip_extras(models, prefix, te, out, dtype))
    return out


def _open_clip_extras(models: SDModels, prefix: str, te, ldm: dict, dtype) -> dict[str, torch.Tensor]:
    """SD2: the 24th block and projection that SD2 never uses; both: logit_scale (spec §f)."""
    carried = {k: v for k, v in models.te_extras.items() if k.startswith(prefix)}
    extras = dict(_cast(carried, dtype))
    if models.family == "sd2" and not carried:
        # no source file to copy from: fake them as sd-scripts does (last block = copy of the one before)
        last = te.config.num_hidden_layers
        src = f"{prefix}transformer.resblocks.{last - 1}."
        for k in [k for k in ldm if k.startswith(src)]:
            extras[f"{prefix}transformer.resblocks.{last}." + k[len(src):]] = ldm[k].clone()
        width = te.config.hidden_size
        extras[f"{prefix}text_projection"] = torch.ones(width, width, dtype=dtype or torch.float32)
        extras[f"{prefix}logit_scale"] = torch.tensor(1.0, dtype=dtype or torch.float32)
    elif f"{prefix}logit_scale" not in extras:
        extras[f"{prefix}logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=dtype or torch.float32)
    return extras


def models_to_ldm(models: SDModels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model set as one LDM state dict."""
    unet_sd = _cast(models.unet.state_dict(), dtype)
    vae_sd = _cast(models.vae.state_dict(), dtype)
    out = model_to_ldm(unet_sd, unet_rules(unet_sd.keys(), models.unet.config), UNET_PREFIX)
    out.update(model_to_ldm(vae_sd, vae_rules(vae_sd.keys(), models.vae.config), VAE_PREFIX))
    out.update(text_encoder_to_ldm(models, dtype))
    return out


def save_ldm_checkpoint(models: SDModels, path: str, dtype: torch.dtype | None = None,
                        metadata: Mapping[str, str] | None = None, epoch: int = 0, global_step: int = 0,
                        source_extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write an original-layout checkpoint: ``.safetensors`` (with metadata) or a ``.ckpt`` pickle.

    ``source_extra``: tensors of a source file to keep (e.g. EMA keys); the model's tensors win.
    """
    sd = dict(source_extra or {})
    sd.update(models_to_ldm(models, dtype))
    is_st = str(path).lower().endswith(".safetensors")
    extra = None if is_st else {"epoch": epoch, "global_step": global_step}
    groups = {NORM_GROUPS_KEYS[part]: str(m.config.norm_num_groups)
              for part, m in (("unet", models.unet), ("vae", models.vae)) if m.config.norm_num_groups != 32}
    if groups and not is_st:
        raise UserError(f"{path}: this model uses GroupNorm with {sorted(set(groups.values()))} groups, which only "
                        ".safetensors files can record; save as .safetensors")
    save_state_dict(sd, path, metadata={**(metadata or {}), **groups} if (metadata or groups) else None,
                    ckpt_extra=extra)
    logger.info("saved %s checkpoint %s", models.family.upper(), path)


# ---------------------------------------------------------------- Diffusers folder

def _scheduler(models: SDModels):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler  # start-up (diffusers: ~2 s)

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, prediction_type="v_prediction" if models.v_parameterization else "epsilon")
    if models.family == "sdxl":
        return EulerDiscreteScheduler(interpolation_type="linear", timestep_spacing="leading", **common)
    return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)


def _model_index(models: SDModels, scheduler_cls: str) -> dict:
    import diffusers  # start-up (diffusers: ~2 s)

    idx = {
        "_class_name": "StableDiffusionXLPipeline" if models.is_sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler_cls],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if models.is_sdxl:
        idx.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                   tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True,
                   image_encoder=[None, None], feature_extractor=[None, None])
    else:
        idx.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False,
                   image_encoder=[None, None])
    return idx


# file names the loaders look for: diffusers (U-Net, VAE) and transformers (text encoders); transformers reads
# `model.safetensors` but `pytorch_model.bin`, so a `model.bin` text encoder made the folder unloadable
WEIGHT_NAMES = {"diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "transformers": ("model.safetensors", "pytorch_model.bin")}


def _save_weights(sd: dict, folder: Path, library: str, use_safetensors: bool) -> None:
    st_name, bin_name = WEIGHT_NAMES[library]
    if use_safetensors:
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / st_name), metadata={"format": "pt"})
    else:
        torch.save(sd, folder / bin_name)


def save_part_folder(model: torch.nn.Module, folder: Path, library: str, use_safetensors: bool,
                     sd: Mapping[str, torch.Tensor]) -> None:
    """One component folder of a Diffusers pipeline: its config and the weights ``sd`` (already cast)."""
    folder.mkdir(parents=True)
    if library == "diffusers":
        model.save_config(folder)
    else:
        model.config.save_pretrained(folder)
    _save_weights(dict(sd), folder, library, use_safetensors)


def save_diffusers(models: SDModels, folder: str, dtype: torch.dtype | None = None,
                   reference_model: str | None = None, use_safetensors: bool = True) -> None:
    """Write a Diffusers pipeline folder. Scheduler and tokenizers come from ``reference_model`` when given."""
    from .tokenizers import save_tokenizers  # start-up (imports transformers: ~1 s)

    with atomic_path(folder) as tmp:
        root = Path(tmp)
        for name, model in (("unet", models.unet), ("vae", models.vae)):
            save_part_folder(model, root / name, "diffusers", use_safetensors, _cast(model.state_dict(), dtype))
        for i, te in enumerate(models.text_encoders):
            sd = _cast(te.state_dict(), dtype)
            # hub layout keeps `text_model.` whatever the installed transformers names internally (pitfall 11)
            sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
            save_part_folder(te, root / ("text_encoder" if i == 0 else f"text_encoder_{i + 1}"), "transformers",
                             use_safetensors, sd)
        sched_cls = _write_scheduler_and_tokenizers(models, root, reference_model, save_tokenizers)
        (root / "model_index.json").write_text(json.dumps(_model_index(models, sched_cls), indent=2), encoding="utf-8")
    logger.info("saved %s Diffusers folder %s", models.family.upper(), folder)


def _write_scheduler_and_tokenizers(models: SDModels, root: Path, reference_model: str | None, save_tokenizers) -> str:
    ref = Path(reference_model) if reference_model else None
    if ref is not None and (ref / "scheduler" / "scheduler_config.json").exists():
        shutil.copytree(ref / "scheduler", root / "scheduler")
        cls = json.loads((ref / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))["_class_name"]
    else:
        sched = _scheduler(models)
        sched.save_config(root / "scheduler")
        cls = type(sched).__name__
    copied = False
    if ref is not None:
        for sub in ("tokenizer", "tokenizer_2"):
            if (ref / sub).is_dir():
                shutil.copytree(ref / sub, root / sub)
                copied = True
    if not copied:
        save_tokenizers(models.tokenizers, str(root))
    return cls
