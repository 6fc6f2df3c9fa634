"""Checkpoint <-> Diffusers conversion (convert_model.py), sd-scripts' converter options plus SDXL and FLUX.1.

FLUX.1: a BFL transformer file (+ ``--ae``, ``--clip_l``, ``--t5xxl``) <-> a Diffusers FLUX folder; a FLUX
single file holds only the transformer, so folder -> file writes the transformer.
"""
from __future__ import annotations

import argparse
import ast
import logging
import os

import torch

from library.errors import UserError

from .flux_loading import is_flux, load_flux_models, load_flux_transformer
from .flux_saving import save_flux_diffusers, save_flux_transformer
from .loading import load_models
from .saving import save_diffusers, save_ldm_checkpoint

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
SINGLE_FILE_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """Options of sd-scripts' tools/convert_diffusers20_original_sd.py (spec utilities §12), plus --sdxl."""
    p.add_argument("model_to_load", help="source: a .safetensors/.ckpt file (original layout) or a Diffusers folder")
    p.add_argument("model_to_save", help="destination: a file name with extension -> single file "
                   "(.safetensors by extension, else torch.save); without extension -> Diffusers folder")
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("--v1", action="store_true", help="the model is SD 1.x (checked against the weights)")
    fam.add_argument("--v2", action="store_true", help="the model is SD 2.x (checked against the weights)")
    fam.add_argument("--sdxl", action="store_true", help="the model is SDXL (checked against the weights)")
    p.add_argument("--v_parameterization", action="store_true",
                   help="Diffusers output: write a v-prediction scheduler config")
    p.add_argument("--unet_use_linear_projection", action="store_true",
                   help="Diffusers output of SD 2.x: U-Net proj_in/proj_out as Linear (as Stability's Diffusers models)")
    p.add_argument("--fp16", action="store_true", help="load a Diffusers model as fp16 and save as fp16")
    p.add_argument("--bf16", action="store_true", help="save as bf16")
    p.add_argument("--float", action="store_true", help="save as float32")
    p.add_argument("--save_precision_as", type=str, default="no", choices=["fp16", "bf16", "float", "no"],
                   help="save precision (alternative to --fp16/--bf16/--float)")
    p.add_argument("--epoch", type=int, default=0, help="epoch written into a .ckpt output")
    p.add_argument("--global_step", type=int, default=0, help="global_step written into a .ckpt output")
    p.add_argument("--metadata", type=str, default=None,
                   help='safetensors metadata as a dict literal, e.g. "{\'title\': \'x\'}" (parsed safely, never evaluated)')
    p.add_argument("--variant", type=str, default=None, help="Diffusers variant to load, e.g. fp16")
    p.add_argument("--reference_model", type=str, default=None,
                   help="Diffusers folder whose scheduler and tokenizer configs are copied into a Diffusers output "
                        "(default: built locally, no download)")
    p.add_argument("--use_safetensors", action="store_true", help="Diffusers output weights in .safetensors")
    p.add_argument("--vae", type=str, default=None, help="replace the VAE (file or Diffusers folder)")
    p.add_argument("--tokenizer_cache_dir", type=str, default=None, help="offline tokenizer folder (see training)")
    flux = p.add_argument_group("FLUX.1 (a BFL transformer file -> Diffusers folder needs the other parts)")
    flux.add_argument("--ae", type=str, default=None, help="FLUX AE: ae.safetensors or a Diffusers VAE folder")
    flux.add_argument("--clip_l", type=str, default=None, help="FLUX CLIP-L: clip_l.safetensors or a folder")
    flux.add_argument("--t5xxl", type=str, default=None,
                      help="FLUX T5-XXL: t5xxl_fp16.safetensors or a folder (a folder's tokenizer is used too)")


def save_dtype(args: argparse.Namespace) -> torch.dtype | None:
    flags = [n for n in ("fp16", "bf16", "float") if getattr(args, n)]
    if len(flags) > 1 or (flags and args.save_precision_as != "no"):
        raise UserError("give at most one of --fp16, --bf16, --float, --save_precision_as")
    name = flags[0] if flags else (None if args.save_precision_as == "no" else args.save_precision_as)
    return SAVE_DTYPES[name] if name else None


def parse_metadata(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise UserError(f"--metadata: not a dict literal ({e})") from None
    if not isinstance(value, dict):
        raise UserError("--metadata: expected a dict literal such as \"{'title': 'x'}\"")
    return {str(k): str(v) for k, v in value.items()}


def convert(args: argparse.Namespace) -> None:
    """Load ``model_to_load``, save as ``model_to_save`` (numbered steps as sd-scripts' converter)."""
    # 1. what to write, and in which precision
    dtype = save_dtype(args)
    metadata = parse_metadata(args.metadata)
    to_file = os.path.splitext(args.model_to_save)[1].lower() in SINGLE_FILE_EXTS
    if not to_file and os.path.isfile(args.model_to_save):
        raise UserError(f"{args.model_to_save}: exists as a file; a Diffusers output is a folder")
    # 2. load (fp16 load only for Diffusers sources, as upstream)
    load_dtype = torch.float16 if args.fp16 and os.path.isdir(args.model_to_load) else torch.float32
    flux_parts = [o for o in ("ae", "clip_l", "t5xxl") if getattr(args, o)]
    if os.path.exists(args.model_to_load) and is_flux(args.model_to_load):
        return convert_flux(args, dtype, metadata, load_dtype, to_file)
    if flux_parts:
        raise UserError(f"--{flux_parts[0]} is only for FLUX.1 models; {args.model_to_load} is not one")
    sdxl = True if args.sdxl else (False if (args.v1 or args.v2) else None)
    models = load_models(args.model_to_load, v2=args.v2, sdxl=sdxl, v_parameterization=args.v_parameterization,
                         vae=args.vae, dtype=load_dtype, tokenizer_cache_dir=args.tokenizer_cache_dir,
                         variant=args.variant)
    if args.v1 and models.family != "sd1":
        raise UserError(f"{args.model_to_load}: --v1 was given but this is an {models.family.upper()} model")
    # 3. save
    if to_file:
        if metadata and not args.model_to_save.lower().endswith(".safetensors"):
            logger.warning("--metadata is only stored in .safetensors files; %s gets none", args.model_to_save)
        save_ldm_checkpoint(models, args.model_to_save, dtype=dtype, metadata=metadata,
                            epoch=args.epoch, global_step=args.global_step)
    else:
        if args.unet_use_linear_projection:
            models.unet = use_linear_projection(models.unet)
        save_diffusers(models, args.model_to_save, dtype=dtype, reference_model=args.reference_model,
                       use_safetensors=args.use_safetensors)


def convert_flux(args: argparse.Namespace, dtype: torch.dtype | None, metadata: dict | None,
                 load_dtype: torch.dtype, to_file: bool) -> None:
    """BFL file (+ --ae/--clip_l/--t5xxl) -> Diffusers folder, folder -> BFL transformer file, or a precision change."""
    not_flux = [f"--{o}" for o in ("v1", "v2", "sdxl", "v_parameterization", "unet_use_linear_projection")
                if getattr(args, o)] + [f"--{o}" for o in ("vae", "reference_model") if getattr(args, o)]
    if not_flux:
        raise UserError(f"{not_flux[0]}: not for FLUX.1 models ({args.model_to_load}); FLUX takes --ae, --clip_l, --t5xxl")
    if to_file:
        if not args.model_to_save.lower().endswith(".safetensors"):
            raise UserError(f"{args.model_to_save}: FLUX.1 single files are .safetensors")
        given = [f"--{o}" for o in ("ae", "clip_l", "t5xxl") if getattr(args, o)]
        if given:
            raise UserError(f"{given[0]}: a FLUX.1 single file holds only the transformer; nothing else is written")
        transformer = load_flux_transformer(args.model_to_load, load_dtype, args.variant)
        save_flux_transformer(transformer, args.model_to_save, dtype=dtype, metadata=metadata)
        return
    if metadata:
        logger.warning("--metadata is only stored in single files; the Diffusers folder gets none")
    models = load_flux_models(args.model_to_load, ae=args.ae, clip_l=args.clip_l, t5xxl=args.t5xxl, dtype=load_dtype,
                              tokenizer_cache_dir=args.tokenizer_cache_dir, variant=args.variant)
    save_flux_diffusers(models, args.model_to_save, dtype=dtype, use_safetensors=args.use_safetensors)


def use_linear_projection(unet):
    """Rebuild a U-Net whose proj_in/proj_out are 1x1 convs with Linear ones (same weights, squeezed)."""
    from diffusers import UNet2DConditionModel  # start-up (diffusers: ~2 s)

    if unet.config.use_linear_projection:
        return unet
    sd = {k: (v.reshape(v.shape[0], v.shape[1]) if v.ndim == 4 and (".proj_in." in k or ".proj_out." in k) else v)
          for k, v in unet.state_dict().items()}
    new = UNet2DConditionModel.from_config({**unet.config, "use_linear_projection": True})
    new.load_state_dict(sd)
    return new.to(next(unet.parameters()).dtype)
