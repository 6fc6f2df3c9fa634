"""gen_img's FLUX.1 options, and which options and prompt-line options each model family accepts.

The FLUX.1 options are named as in sd-scripts' FLUX scripts (``add_flux_train_arguments``: ``--ae``,
``--clip_l``, ``--t5xxl``, ``--t5xxl_max_token_length``, ``--apply_t5_attn_mask``, ``--guidance_scale``;
``--guidance`` is flux_minimal_inference's name of the last one). The model family is known from the
``--ckpt`` keys before anything loads, so an option that cannot apply to it is one error line then.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

from library.config.options_common import section
from library.config.ranges import at_least, ranged
from library.errors import UserError
from library.formats.flux_metadata import FLUX_NETWORK_MODULE
from library.formats.tensor_file import TensorFile, read_tensor_file
from library.models.flux_loading import is_flux
from library.models.flux_preflight import transformer_config
from library.models.t5_tokenizer import load_t5_tokenizer
from library.sampling.prompt_file import PromptOptions, line_option_key
from networks.lora_family import FAMILY_NAMES, FLUX, SDXL, family_of
from networks.lora_flux_options import parse_flux_options
from networks.network_host import parse_network_args

FLUX_ONLY = ("ae", "clip_l", "t5xxl", "t5xxl_max_token_length", "apply_t5_attn_mask", "guidance_scale")

_SD_FLAGS = "an SD model flag"
_CFG = "classifier-free guidance; FLUX.1 dev takes --guidance_scale"
_IMG2IMG = "img2img / inpaint are not supported for FLUX.1 yet"
_HIRES = "hires fix is not supported for FLUX.1 yet"
_REGIONAL = "regional LoRA needs U-Net feature maps; FLUX.1 LoRAs apply to the whole image"
_SIZE_COND = "SDXL size conditioning"
_PROMPT_ENC = "SD prompt encoding; FLUX.1 prompts are encoded as written"
_CONTROL = "ControlNet / ControlNet-LLLite are for SD models"
_UNET = "a U-Net feature"

# option -> why it cannot apply to FLUX.1; given with a FLUX.1 model (not at its default) is an error
NOT_FOR_FLUX: dict[str, str] = {
    "sdxl": _SD_FLAGS, "v1": _SD_FLAGS, "v2": _SD_FLAGS, "v_parameterization": _SD_FLAGS,
    "vae": "the FLUX.1 autoencoder is given with --ae",
    "xformers": "FLUX.1 uses PyTorch's scaled-dot-product attention", "diffusers_xformers": "FLUX.1 uses PyTorch's "
    "scaled-dot-product attention", "opt_channels_last": _UNET,
    "clip_skip": _PROMPT_ENC, "max_embeddings_multiples": _PROMPT_ENC, "emb_normalize_mode": _PROMPT_ENC,
    "scale": _CFG, "negative_scale": _CFG,
    **{n: _SIZE_COND for n in ("original_width", "original_height", "original_width_negative",
                               "original_height_negative", "crop_top", "crop_left")},
    "image_path": _IMG2IMG, "mask_path": _IMG2IMG + " (nor are regional LoRA masks)", "strength": _IMG2IMG,
    "network_regional_mask_max_color_codes": _REGIONAL,
    **{n: _HIRES for n in ("highres_fix_scale", "highres_fix_steps", "highres_fix_strength", "highres_fix_save_1st",
                           "highres_fix_latents_upscaling", "highres_fix_upscaler", "highres_fix_upscaler_args",
                           "highres_fix_disable_control_net")},
    "textual_inversion_embeddings": "Textual Inversion embeddings are for SD text encoders",
    **{n: _UNET + " (Deep Shrink)" for n in ("ds_depth_1", "ds_timesteps_1", "ds_depth_2", "ds_timesteps_2",
                                             "ds_ratio")},
    **{n: "an Euler-a U-Net feature (Gradual Latent)" for n in (
        "gradual_latent_timesteps", "gradual_latent_ratio", "gradual_latent_ratio_step",
        "gradual_latent_every_n_steps", "gradual_latent_s_noise", "gradual_latent_unsharp_params")},
    **{n: _CONTROL for n in ("control_net_models", "control_net_preps", "control_net_ratios", "control_net_weights",
                             "control_net_lllite_models", "control_net_multipliers", "guide_image_path")},
}

FLUX_SIZE_MULTIPLE = 16  # the AE's 8 pixels per latent pixel x the 2x2 latent patches
FLUX_SAMPLERS = ("ddim", "euler", "k_euler")  # ddim: gen_img's default, i.e. no sampler asked for

# prompt-line field -> why a FLUX.1 line cannot use it
LINE_NOT_FOR_FLUX: dict[str, str] = {
    "scale": _CFG, "negative_scale": _CFG, "negative_prompt": _CFG, "strength": _IMG2IMG,
    "clip_prompt": _PROMPT_ENC,
    **{n: _SIZE_COND for n in ("original_width", "original_height", "original_width_negative",
                               "original_height_negative", "crop_top", "crop_left")},
    **{n: "a U-Net feature" for n in ("ds_depth_1", "ds_timesteps_1", "ds_depth_2", "ds_timesteps_2", "ds_ratio",
                                      "gradual_latent_timesteps", "gradual_latent_ratio", "gradual_latent_ratio_step",
                                      "gradual_latent_every_n_steps", "gradual_latent_s_noise",
                                      "gradual_latent_unsharp_params")},
}


def add_flux_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "FLUX.1 (dev / schnell; the --ckpt keys say which model it is)")
    g.add_argument("--ae", type=str, default=None,
                   help="FLUX.1 autoencoder: BFL ae.safetensors or a Diffusers VAE folder (needed with a single file)")
    g.add_argument("--clip_l", type=str, default=None, help="FLUX.1 CLIP-L text encoder file or folder")
    g.add_argument("--t5xxl", type=str, default=None,
                   help="FLUX.1 T5-XXL encoder file or folder (a folder may also hold the T5 tokenizer)")
    ranged(g.add_argument("--t5xxl_max_token_length", type=int, default=None,
                          help="T5 tokens per prompt (default 512 for dev, 256 for schnell)"), at_least(1))
    g.add_argument("--apply_t5_attn_mask", action="store_true",
                   help="mask T5 padding in the T5 encoder and in the transformer's attention")
    ranged(g.add_argument("--guidance_scale", "--guidance", type=float, default=None,
                          help="FLUX.1 dev distilled guidance (default 3.5; prompt line --g); schnell has none"),
           at_least(0))


def _given(args: argparse.Namespace, defaults: argparse.Namespace, names) -> list[str]:
    return [n for n in names if getattr(args, n) != getattr(defaults, n)]


def flux_model_name(args: argparse.Namespace, defaults: argparse.Namespace, ckpt_path: str | None) -> str | None:
    """"dev" / "schnell" when ``--ckpt`` is a FLUX.1 transformer (file header or folder config), else None.

    Checks the options against the family (an option differing from ``defaults``, gen_img's parser defaults,
    was given): SD-only options with FLUX.1, FLUX.1 options with SD; for FLUX.1 also
    the guidance of schnell and that a T5 tokenizer is at hand offline (all before any weight loads)."""
    if ckpt_path is None or not is_flux(ckpt_path):
        given = _given(args, defaults, FLUX_ONLY)
        if given:
            raise UserError(f"--{given[0]} is a FLUX.1 option, but --ckpt {args.ckpt} is not a FLUX.1 model")
        check_sd_networks(args)
        return None
    for name in _given(args, defaults, NOT_FOR_FLUX):
        raise UserError(f"--{name} cannot be used with a FLUX.1 model ({NOT_FOR_FLUX[name]})")
    if args.sampler not in FLUX_SAMPLERS:
        raise UserError(f"--sampler {args.sampler}: FLUX.1 samples with the flow-matching Euler sampler only "
                        "(leave --sampler out or give euler)")
    for option in ("W", "H"):
        value = getattr(args, option)
        if value is not None and value % FLUX_SIZE_MULTIPLE:
            raise UserError(f"--{option} {value}: FLUX.1 image sizes are multiples of {FLUX_SIZE_MULTIPLE}")
    name = "dev" if transformer_config(ckpt_path)["guidance_embeds"] else "schnell"
    if name == "schnell" and args.guidance_scale is not None:
        raise UserError("--guidance_scale: FLUX.1 schnell has no guidance input (only dev is guidance-distilled)")
    check_flux_networks(args)
    load_t5_tokenizer(ckpt_path if os.path.isdir(ckpt_path) else None, args.t5xxl, args.tokenizer_cache_dir)
    return name


def _readable_network_files(args: argparse.Namespace) -> list[TensorFile]:
    """The ``--network_weights`` headers that can be read (an unreadable file is named by the input checks)."""
    files = []
    for path in args.network_weights or []:
        try:
            files.append(read_tensor_file(path, "--network_weights"))
        except UserError:
            continue
    return files


def check_sd_networks(args: argparse.Namespace) -> None:
    """An SD ``--ckpt``: neither the FLUX.1 network plug-in nor a FLUX.1 LoRA file (known from its header)."""
    if FLUX_NETWORK_MODULE in (args.network_module or []):
        raise UserError(f"--network_module {FLUX_NETWORK_MODULE} is for FLUX.1 models, but --ckpt {args.ckpt} is "
                        "not a FLUX.1 model")
    for tf in _readable_network_files(args):
        if family_of(tf, "--network_weights", require_known=False) == FLUX:
            raise UserError(f"--network_weights {tf.path} is a FLUX.1 LoRA, but --ckpt {args.ckpt} is not a FLUX.1 "
                            "model")


def _clip_l_only(tf: TensorFile) -> bool:
    """Only ``lora_te1_`` modules: a FLUX.1 LoRA of CLIP-L alone reads like an SDXL one."""
    names = list(tf.modules())
    return bool(names) and all(n.startswith("lora_te1_") for n in names)


def check_flux_networks(args: argparse.Namespace) -> None:
    """A FLUX.1 ``--ckpt``: every network is ``networks.lora_flux``, no file is an SD LoRA, every
    ``--network_args`` string is one the FLUX.1 LoRA takes. Whether each module fits a layer of the model is
    known once the model is loaded (the plug-in says so in one line)."""
    for name in args.network_module or []:
        if name != FLUX_NETWORK_MODULE:
            raise UserError(f"--network_module {name} cannot be used with a FLUX.1 model: FLUX.1 LoRAs are applied "
                            f"by --network_module {FLUX_NETWORK_MODULE}")
    for tf in _readable_network_files(args):
        family = family_of(tf, "--network_weights", require_known=False)
        if family not in (None, FLUX) and not (family == SDXL and _clip_l_only(tf)):
            raise UserError(f"--network_weights {tf.path} is an {FAMILY_NAMES[family]} LoRA, but --ckpt {args.ckpt} "
                            "is a FLUX.1 model")
    for text in args.network_args or []:
        parse_flux_options(parse_network_args([item for item in text.split(";") if item.strip()]))


def check_line_family(options: PromptOptions, line: str, flux_name: str | None) -> None:
    """A prompt line's options suit the model: FLUX.1 lines take no SD-only options, SD lines no ``--g``."""
    given: Mapping[str, Any] = options.overrides()
    if flux_name is None:
        if "guidance_scale" in given:
            raise UserError(f"prompt option --g is for FLUX.1 dev models only: {line}")
        return
    for field in given:
        if field in LINE_NOT_FOR_FLUX:
            raise UserError(f"prompt option --{line_option_key(field)} cannot be used with a FLUX.1 model "
                            f"({LINE_NOT_FOR_FLUX[field]}): {line}")
    for field in ("width", "height"):
        if given.get(field) is not None and given[field] % FLUX_SIZE_MULTIPLE:
            raise UserError(f"prompt option --{line_option_key(field)} {given[field]}: FLUX.1 image sizes are "
                            f"multiples of {FLUX_SIZE_MULTIPLE}: {line}")
    if flux_name == "schnell" and "guidance_scale" in given:
        raise UserError(f"prompt option --g: FLUX.1 schnell has no guidance input: {line}")
