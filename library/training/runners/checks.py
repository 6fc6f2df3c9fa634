"""Cross-option checks of every trainer (spec cli-options §13), with one clear line per problem."""
from __future__ import annotations

import argparse
import logging

from library.config.options import TEXTUAL_INVERSION_SCRIPTS
from library.data.custom_dataset import check_dataset_class, load_dataset_class
from library.errors import UserError

logger = logging.getLogger(__name__)


HUB_OPTIONS = ("huggingface_repo_type", "huggingface_path_in_repo", "huggingface_repo_visibility",
               "save_state_to_huggingface", "async_upload")


def check_hub_options(args: argparse.Namespace) -> None:
    """Hub upload / download options (library/training/extras/hub_upload.py): warn where one has no effect."""
    if getattr(args, "resume_from_huggingface", False) and not getattr(args, "resume", None):
        logger.warning("--resume_from_huggingface without --resume: nothing to download, training starts fresh")
    if not getattr(args, "huggingface_repo_id", None):
        given = [o for o in HUB_OPTIONS if getattr(args, o, None) not in (None, False)]
        if given:
            logger.warning("--%s has no effect without --huggingface_repo_id (nothing is uploaded)", given[0])
        if getattr(args, "huggingface_token", None) and not getattr(args, "resume_from_huggingface", False):
            logger.info("--huggingface_token is only used for hub uploads (--huggingface_repo_id) and "
                        "--resume_from_huggingface; it is kept out of every file it writes")
        return
    visibility = getattr(args, "huggingface_repo_visibility", None)
    if visibility not in (None, "public", "private"):
        logger.warning("--huggingface_repo_visibility %s: only 'public' makes a new repository public; it will be "
                       "private", visibility)
    if getattr(args, "save_state_to_huggingface", False) and not (
            getattr(args, "save_state", False) or getattr(args, "save_state_on_train_end", False)):
        logger.warning("--save_state_to_huggingface without --save_state (or --save_state_on_train_end): "
                       "no state folder is saved, so none is uploaded")


def reject_unsupported(args: argparse.Namespace, script: str) -> None:
    """Options of the spec this project does not implement yet: a clear error, never a silent no-op."""
    if getattr(args, "lowram", False):
        logger.info("--lowram: models are always loaded tensor by tensor (peak about one model) and moved to the "
                    "device right after; nothing more to do")
    if getattr(args, "highvram", False):
        logger.info("--highvram: the CUDA cache is never emptied between latent-caching batches here anyway")


DATASET_CLASS_REPLACES = ("dataset_config", "train_data_dir", "reg_data_dir", "in_json")
DATASET_CLASS_EXCLUDES = ("cache_latents", "cache_text_encoder_outputs", "dry_run")


def check_dataset_class_options(args: argparse.Namespace, script: str) -> None:
    """``--dataset_class`` (library/data/custom_dataset.py): the class imports and has what the loop calls,
    before any model loads; the options it replaces are named, the ones it cannot serve refused."""
    path = getattr(args, "dataset_class", None)
    if not path:
        return
    for option in DATASET_CLASS_EXCLUDES:
        if getattr(args, option, False):
            raise UserError(f"--{option} cannot be used with --dataset_class: the class's batches bring their "
                            "own images and token ids")
    check_dataset_class(load_dataset_class(path), path, textual_inversion=script in TEXTUAL_INVERSION_SCRIPTS)
    given = [f"--{o}" for o in DATASET_CLASS_REPLACES if getattr(args, o, None)]
    if given:
        logger.warning("%s ignored: --dataset_class %s supplies the training data", ", ".join(given), path)


def verify_training_args(args: argparse.Namespace, script: str) -> None:
    """Errors and warnings of sd-scripts' ``verify_training_args`` and the trainers' assertions."""
    reject_unsupported(args, script)
    check_dataset_class_options(args, script)
    check_hub_options(args)
    if getattr(args, "v_parameterization", False) and not getattr(args, "v2", False):
        logger.warning("--v_parameterization without --v2: the model must have been trained for v-prediction")
    if getattr(args, "clip_skip", None) is not None and getattr(args, "v2", False):
        logger.warning("--clip_skip with --v2: SD2's text encoder is loaded without its last layer already")
    if getattr(args, "zero_terminal_snr", False) and not getattr(args, "v_parameterization", False):
        logger.warning("--zero_terminal_snr without --v_parameterization gives a model that cannot denoise pure noise well")
    if getattr(args, "adaptive_noise_scale", None) is not None and getattr(args, "noise_offset", None) is None:
        raise UserError("--adaptive_noise_scale needs --noise_offset")
    if getattr(args, "scale_v_pred_loss_like_noise_pred", False) and not getattr(args, "v_parameterization", False):
        raise UserError("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
    if getattr(args, "v_pred_like_loss", None) and getattr(args, "v_parameterization", False):
        raise UserError("--v_pred_like_loss cannot be used with --v_parameterization")
    mp = getattr(args, "mixed_precision", "no")
    if getattr(args, "full_fp16", False) and mp != "fp16" and script not in TEXTUAL_INVERSION_SCRIPTS:
        raise UserError("--full_fp16 needs --mixed_precision fp16")
    if getattr(args, "full_bf16", False) and mp != "bf16" and script in (
            "train_network", "sdxl_train_network", "flux_train_network", "sdxl_train"):
        raise UserError("--full_bf16 needs --mixed_precision bf16")
    if getattr(args, "fp8_base", False) and mp == "no":
        raise UserError("--fp8_base needs --mixed_precision fp16 or bf16")
    if getattr(args, "lr_scheduler", "constant") == "constant" and getattr(args, "lr_warmup_steps", 0):
        raise UserError("--lr_scheduler constant cannot warm up; use --lr_scheduler constant_with_warmup")
    if getattr(args, "max_token_length", None) not in (None, 150, 225):
        raise UserError("--max_token_length must be 150 or 225 (or omitted for 75)")
