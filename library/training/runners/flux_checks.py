"""flux_train_network.py's checks before any model loads: the model is FLUX.1 and its parts fit, and every
option this trainer cannot honour is refused in one line (never silently ignored)."""
from __future__ import annotations

import argparse
import logging
import os

from library.config.options_flux import NEWER_UPSTREAM_OPTIONS
from library.errors import UserError
from library.models.flux_loading import is_flux
from library.models.flux_preflight import check_flux_parts
from library.models.loading import peek_family
from library.training.memory.block_swap import flux_block_split
from networks.network_host import parse_network_args

logger = logging.getLogger(__name__)

FLUX_NETWORK_MODULE = "networks.lora_flux"
_NOT_YET = "is not supported for FLUX.1 training yet"
# option -> why it is refused (a true flag or a value other than None)
_REFUSED = {
    "model_type": None,  # checked by value below
    "controlnet_model_name_or_path": "belongs to upstream's flux_train_control_net.py",
    "dataset_class": _NOT_YET,
    "xformers": "is not used by FLUX.1 (PyTorch's attention)", "mem_eff_attn": "is not used by FLUX.1",
    "vae": "is an SD option; FLUX.1 takes its autoencoder from --ae",
    "v2": "is an SD 2.x option", "v_parameterization": "is an SD option (FLUX.1 predicts noise - latents)",
    "zero_terminal_snr": "is an SD noise-schedule option", "weighted_captions": _NOT_YET,
    "clip_skip": "is not used by FLUX.1", "noise_offset": "is not applied by sd-scripts' FLUX trainer",
    "multires_noise_iterations": "is not applied by sd-scripts' FLUX trainer",
    "min_snr_gamma": "needs an SNR, which flow matching has not", "debiased_estimation_loss": "needs an SNR",
    "scale_v_pred_loss_like_noise_pred": "is a v-prediction option", "v_pred_like_loss": "is a v-prediction option",
    "min_timestep": "is not used by FLUX.1's timestep sampling (--timestep_sampling)",
    "max_timestep": "is not used by FLUX.1's timestep sampling (--timestep_sampling)",
}


_REFUSED.update({name: "is an option of current sd-scripts that is not supported here yet"
                 for name in NEWER_UPSTREAM_OPTIONS})

# values that change nothing (front-ends write them by default): no refusal
_NEUTRAL = {"clip_skip": 1, "max_timestep": 1000, "huber_scale": 1.0}


def reject_flux_options(args: argparse.Namespace) -> None:
    """One line for the first option set that flux_train_network.py does not support."""
    if getattr(args, "model_type", "flux") != "flux":
        raise UserError(f"--model_type {args.model_type} {_NOT_YET}: only flux")
    for option, why in _REFUSED.items():
        value = getattr(args, option, None)
        if why is None or value in (None, False, 0, [], "") or value == _NEUTRAL.get(option):
            continue
        raise UserError(f"--{option} {why}")
    module = getattr(args, "network_module", None)
    if module not in (None, FLUX_NETWORK_MODULE):
        raise UserError(f"--network_module {module}: flux_train_network.py trains {FLUX_NETWORK_MODULE} only "
                        "(other network modules are not supported for FLUX.1 yet)")
    fp8 = getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False)
    if fp8 and getattr(args, "sample_prompts", None):
        raise UserError("--sample_prompts with --fp8_base / --fp8_base_unet " + _NOT_YET)
    if getattr(args, "fp8_base_unet", False) and getattr(args, "mixed_precision", "no") == "no":
        raise UserError("--fp8_base_unet needs --mixed_precision fp16 or bf16")
    t5_trains = parse_network_args(getattr(args, "network_args", None)).get("train_t5xxl") == "True"
    if getattr(args, "cache_text_encoder_outputs", False) and t5_trains \
            and not getattr(args, "network_train_unet_only", False):
        raise UserError("--cache_text_encoder_outputs cannot be used when T5-XXL trains (network_args train_t5xxl), "
                        "as in sd-scripts")
    if getattr(args, "loss_type", "l2") != "l2" and getattr(args, "huber_schedule", "snr") == "snr":
        raise UserError("--huber_schedule snr is not supported for FLUX.1 (no SNR in flow matching): "
                        "use exponential or constant")
    if getattr(args, "max_token_length", None) is not None:
        logger.warning("--max_token_length is not used in FLUX.1 training (CLIP-L: 77 tokens, T5-XXL: "
                       "--t5xxl_max_token_length), as in sd-scripts")


def check_flux_model_inputs(args: argparse.Namespace) -> str:
    """The base model is a FLUX.1 BFL file (with --ae / --clip_l / --t5xxl) or a Diffusers FLUX folder, and the
    parts fit (headers and configs only); returns the family "flux"."""
    path = str(args.pretrained_model_name_or_path)
    if not is_flux(path):
        try:
            family = peek_family(path)
        except UserError:
            family = None
        what = f"an {family.upper()} model" if family else "not a FLUX.1 model"
        raise UserError(f"--pretrained_model_name_or_path {path}: {what}; flux_train_network.py trains FLUX.1 "
                        "(a BFL single file with --ae/--clip_l/--t5xxl, or a Diffusers FLUX folder)")
    parts = {}
    for part in ("ae", "clip_l", "t5xxl"):
        value = getattr(args, part, None)
        if value and not os.path.exists(str(value)):
            raise UserError(f"--{part} {value}: no such file or folder")
        parts[part] = str(value) if value else (path if os.path.isdir(path) else None)
    missing = [f"--{p}" for p, v in parts.items() if v is None]
    if missing:
        raise UserError(f"{path}: a FLUX.1 single file holds only the transformer; give {', '.join(missing)}")
    cfg = check_flux_parts(path, parts)
    if getattr(args, "blocks_to_swap", None):
        flux_block_split(args.blocks_to_swap, cfg["num_layers"], cfg["num_single_layers"])  # fits this model
    return "flux"
