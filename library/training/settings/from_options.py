"""The one place where parsed options become settings (issue 17 item 1).

:func:`resolve_options` fills in every derived value, visibly and in one function, and returns a new options
object (the parsed one is never changed); :func:`build_settings` turns the resolved options into the frozen
:class:`TrainSettings` that everything below the runners reads. Derived values known only once the data is
scanned (steps from ``--max_train_epochs``) come from ``loop_plan`` and are never written back.
"""
from __future__ import annotations

import argparse
import logging
import random
from typing import Any

from library.config.option_record import OptionRecord
from library.config.options import TEXTUAL_INVERSION_SCRIPTS
from library.training.loop.nonfinite_guard import remedies_for
from library.training.objective.losses import LossConfig
from library.training.objective.noise import NoiseConfig
from library.training.settings.loop import LoopSettings
from library.training.settings.sections import (EmaSettings, HubSettings, MethodSettings, ObjectiveSettings,
                                                ResumeSettings, SaveSettings, TextSettings, ValidationSettings)
from library.training.settings.train_settings import TrainSettings

logger = logging.getLogger(__name__)

# sdxl_train: masked loss and --v_pred_like_loss like N; it has no --prior_loss_weight, so every sample weighs 1
LOSS_LETTERS = {"train_network": "N", "sdxl_train_network": "N", "train_db": "D", "fine_tune": "F",
                "train_textual_inversion": "T", "sdxl_train_textual_inversion": "T", "sdxl_train": "X"}
LOSS_LETTERS.update(train_controlnet="N", sdxl_train_control_net_lllite="N")  # no masked loss: weights are all 1
LOSS_LETTERS.update(flux_train_network="N")
SDXL_TE_CACHE_SCRIPTS = ("sdxl_train_network", "sdxl_train", "sdxl_train_control_net_lllite")
TE_CACHE_SCRIPTS = SDXL_TE_CACHE_SCRIPTS + ("flux_train_network",)  # _to_disk implies the cache


def _opt(options: Any, name: str, default: Any = None) -> Any:
    value = getattr(options, name, default)
    return default if value is None and default is not None else value


def derived_values(options: Any, script: str, announce_seed: bool = False) -> dict[str, Any]:
    """The values the trainers derive from others before anything runs: ``{option: value}``, logged."""
    out: dict[str, Any] = {}
    if _opt(options, "cache_latents_to_disk", False) and not _opt(options, "cache_latents", False):
        logger.info("--cache_latents_to_disk implies --cache_latents")
        out["cache_latents"] = True
    if script in TE_CACHE_SCRIPTS and _opt(options, "cache_text_encoder_outputs_to_disk", False) \
            and not _opt(options, "cache_text_encoder_outputs", False):
        logger.info("--cache_text_encoder_outputs_to_disk implies --cache_text_encoder_outputs")
        out["cache_text_encoder_outputs"] = True
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = _opt(options, name)
        if value is not None and value <= 0:
            logger.warning("--%s %s <= 0: sampling by this schedule is disabled", name, value)
            out[name] = None
    if script in TEXTUAL_INVERSION_SCRIPTS and _opt(options, "output_name") is None:
        out["output_name"] = _opt(options, "token_string")  # the file is named after the new word
    if _opt(options, "split_mode", False):  # FLUX.1, deprecated upstream: an alias of --blocks_to_swap 18
        if _opt(options, "blocks_to_swap"):
            logger.warning("--split_mode is deprecated; --blocks_to_swap %d is set, so --split_mode changes nothing",
                           options.blocks_to_swap)
        else:
            logger.warning("--split_mode is deprecated: --blocks_to_swap 18 is used instead, as in sd-scripts")
            out["blocks_to_swap"] = 18
    if _opt(options, "deepspeed", False):
        out["max_data_loader_n_workers"] = 1  # sd-scripts forces one worker with DeepSpeed
    if hasattr(options, "seed") and options.seed is None:
        # sd-scripts leaves D/F/T unseeded; a drawn seed keeps that randomness and makes the run repeatable
        out["seed"] = random.randint(0, 2**32 - 1)
        if announce_seed:
            logger.info("no --seed given: using %d", out["seed"])
    return out


def resolve_options(options: argparse.Namespace, script: str, announce_seed: bool = False) -> argparse.Namespace:
    """A new options object: the parsed values with :func:`derived_values` applied."""
    return argparse.Namespace(**{**vars(options), **derived_values(options, script, announce_seed)})


def build_settings(options: argparse.Namespace, script: str) -> TrainSettings:
    """The frozen settings of a run, from resolved options (:func:`resolve_options`)."""
    return TrainSettings(
        script=script, text=text_settings(options), objective=objective_settings(options, LOSS_LETTERS[script]),
        method=method_settings(options), loop=loop_settings(options), saving=save_settings(options),
        resume=resume_settings(options), hub=hub_settings(options), ema=ema_settings(options),
        validation=validation_settings(options), options=OptionRecord.of(options))


def text_settings(options: Any) -> TextSettings:
    return TextSettings(clip_skip=_opt(options, "clip_skip"), max_token_length=_opt(options, "max_token_length"),
                        weighted_captions=bool(_opt(options, "weighted_captions", False)))


def noise_config(options: Any) -> NoiseConfig:
    """Missing options take the parser defaults (the dataclass's)."""
    defaults = NoiseConfig()
    values = {name: getattr(options, name, getattr(defaults, name)) for name in NoiseConfig.__dataclass_fields__}
    for flag in ("noise_offset_random_strength", "ip_noise_gamma_random_strength", "v_parameterization"):
        values[flag] = bool(values[flag])
    return NoiseConfig(**values)


def loss_config(options: Any, method: str = "N") -> LossConfig:
    """Drops what the method ignores (spec losses §8, pitfall 7)."""
    defaults = LossConfig()
    names = [n for n in LossConfig.__dataclass_fields__ if n != "method"]
    values = {n: getattr(options, n, getattr(defaults, n)) for n in names}
    for flag in ("scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss", "v_parameterization",
                 "masked_loss"):
        values[flag] = bool(values[flag])
    if method in ("D", "F"):
        values["v_pred_like_loss"] = None  # accepted by the parser of train_db/fine_tune but unused upstream
    if method == "F":
        values["masked_loss"] = False  # fine_tune has no masked-loss option group
    return LossConfig(method=method, **values)


def objective_settings(options: Any, method: str) -> ObjectiveSettings:
    return ObjectiveSettings(noise_config(options), loss_config(options, method),
                             zero_terminal_snr=bool(_opt(options, "zero_terminal_snr", False)),
                             v_parameterization=bool(_opt(options, "v_parameterization", False)))


def method_settings(options: Any) -> MethodSettings:
    return MethodSettings(gradient_checkpointing=bool(_opt(options, "gradient_checkpointing", False)),
                          scale_weight_norms=_opt(options, "scale_weight_norms"),
                          stop_text_encoder_training=_opt(options, "stop_text_encoder_training"),
                          no_token_padding=bool(_opt(options, "no_token_padding", False)),
                          train_text_encoder=bool(_opt(options, "train_text_encoder", False)))


def remedies(options: Any) -> dict[str, str]:
    """The non-finite guard's hints for this run's precision."""
    clip = getattr(options, "max_grad_norm", 1.0)
    return remedies_for(_opt(options, "mixed_precision") or "no", full_fp16=bool(_opt(options, "full_fp16", False)),
                        full_bf16=bool(_opt(options, "full_bf16", False)), max_grad_norm=clip,
                        no_half_vae=bool(_opt(options, "no_half_vae", False)))


def loop_settings(options: Any) -> LoopSettings:
    return LoopSettings(seed=options.seed, max_train_steps=options.max_train_steps,
                        max_train_epochs=_opt(options, "max_train_epochs"),
                        gradient_accumulation_steps=options.gradient_accumulation_steps,
                        max_grad_norm=_opt(options, "max_grad_norm") or 0.0,
                        save_state=bool(_opt(options, "save_state", False)),
                        sample_at_first=bool(_opt(options, "sample_at_first", False)),
                        sample_every_n_steps=_opt(options, "sample_every_n_steps"),
                        sample_every_n_epochs=_opt(options, "sample_every_n_epochs"),
                        check_grads=bool(_opt(options, "check_grads", False)), remedies=remedies(options))


def save_settings(options: Any) -> SaveSettings:
    names = ("save_every_n_epochs", "save_n_epoch_ratio", "save_every_n_steps", "save_last_n_epochs",
             "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state")
    flags = ("save_state", "save_state_on_train_end", "save_state_to_huggingface")
    return SaveSettings(output_dir=_opt(options, "output_dir") or ".", output_name=_opt(options, "output_name"),
                        **{n: _opt(options, n) for n in names}, **{f: bool(_opt(options, f, False)) for f in flags})


def resume_settings(options: Any) -> ResumeSettings:
    return ResumeSettings(resume=_opt(options, "resume") or None,
                          from_huggingface=bool(_opt(options, "resume_from_huggingface", False)),
                          inexact=bool(_opt(options, "resume_inexact", False)))


def hub_settings(options: Any) -> HubSettings:
    return HubSettings(repo_id=_opt(options, "huggingface_repo_id") or None,
                       repo_type=_opt(options, "huggingface_repo_type"),
                       path_in_repo=_opt(options, "huggingface_path_in_repo"),
                       token=_opt(options, "huggingface_token"),
                       private=_opt(options, "huggingface_repo_visibility") != "public",
                       async_upload=bool(_opt(options, "async_upload", False)))


def ema_settings(options: Any) -> EmaSettings:
    return EmaSettings(enabled=bool(_opt(options, "ema", False)), decay=_opt(options, "ema_decay", 0.9999),
                       update_after_step=_opt(options, "ema_update_after_step", 0),
                       power=_opt(options, "ema_power"), every_n_steps=_opt(options, "ema_every_n_steps", 1),
                       device=_opt(options, "ema_device", "gpu"),
                       sample_with_ema=bool(_opt(options, "sample_with_ema", False)))


def validation_settings(options: Any) -> ValidationSettings:
    seed = _opt(options, "validation_seed")
    return ValidationSettings(every_n_steps=_opt(options, "validate_every_n_steps"),
                              every_n_epochs=_opt(options, "validate_every_n_epochs"),
                              max_steps=_opt(options, "max_validation_steps"),
                              seed=seed if seed is not None else (_opt(options, "seed") or 0))
