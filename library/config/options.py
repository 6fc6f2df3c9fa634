"""Command-line option groups, declared once and shared by every trainer (spec cli-options).

Each ``add_*_arguments`` function is one sd-scripts argument group with exactly the spec's names,
types, defaults and choices; given a parser it adds a titled ``--help`` section, given an argument
group it adds to that group. ``build_parser(script)`` assembles a trainer's parser as the table at
the top of spec cli-options.md says.
"""
from __future__ import annotations

import argparse
import functools
from typing import Optional

from library.config.options_beyond import add_beyond_arguments
from library.config.options_common import Container, section
from library.config.options_controlnet import (CONTROLNET_SCRIPTS, DESCRIPTIONS, LLLITE_SCRIPT,
                                               add_controlnet_arguments, add_lllite_arguments)
from library.config.options_dataset import add_config_arguments, add_dataset_arguments, add_masked_loss_arguments
from library.config.options_flux import FLUX_DESCRIPTION, FLUX_SCRIPT, add_flux_arguments
from library.config.options_scripts import (add_dreambooth_arguments, add_finetune_arguments,
                                            add_network_trainer_arguments, add_sdxl_train_arguments,
                                            add_textual_inversion_arguments)
from library.config.options_training import add_training_arguments
from library.config.ranges import Range, at_least, ranged, ranges_of
from library.log import add_logging_arguments

SCRIPTS = ("train_network", "sdxl_train_network", "train_db", "fine_tune", "train_textual_inversion", "sdxl_train")
# scripts whose parser is another script's, unchanged (upstream's setup_parser() returns that parser)
SAME_PARSER = {"sdxl_train_textual_inversion": "train_textual_inversion"}
SCRIPTS += tuple(SAME_PARSER) + CONTROLNET_SCRIPTS + (FLUX_SCRIPT,)
TEXTUAL_INVERSION_SCRIPTS = ("train_textual_inversion", "sdxl_train_textual_inversion")

_DESCRIPTIONS = {
    "train_network": "Train a LoRA (or any --network_module) for Stable Diffusion 1.x/2.x.",
    "sdxl_train_network": "Train a LoRA (or any --network_module) for Stable Diffusion XL.",
    "train_db": "DreamBooth: train the U-Net (and text encoder) with optional regularization images.",
    "fine_tune": "Fine-tune a Stable Diffusion model from metadata JSON or a dataset config.",
    "train_textual_inversion": "Train a Textual Inversion embedding.",
    "sdxl_train_textual_inversion": "Train a Textual Inversion embedding for Stable Diffusion XL (both text "
                                    "encoders; clip_l / clip_g file).",
    "sdxl_train": "Fine-tune Stable Diffusion XL in full (U-Net, optionally both text encoders) from metadata "
                  "JSON, DreamBooth folders or a dataset config.",
    **DESCRIPTIONS,
    FLUX_SCRIPT: FLUX_DESCRIPTION,
}


def add_sd_models_arguments(parser: Container) -> None:
    """Base model options (spec cli-options §2)."""
    g = section(parser, "base model")
    g.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x")
    g.add_argument("--v_parameterization", action="store_true",
                   help="train with the v-prediction target (SD 2.x 768px models)")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="base model: a .ckpt/.safetensors file, a Diffusers folder, or a hub id")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder where tokenizers are saved and loaded from (for offline use)")


def add_deepspeed_arguments(parser: Container) -> None:
    """DeepSpeed options (spec cli-options §6)."""
    g = section(parser, "DeepSpeed")
    g.add_argument("--deepspeed", action="store_true",
                   help="train through accelerate's DeepSpeed plugin (forces 1 DataLoader worker)")
    g.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage (default: 2)")
    g.add_argument("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"],
                   help="ZeRO 2/3: offload the optimizer state to this device")
    g.add_argument("--offload_optimizer_nvme_path", type=str, default=None,
                   help="ZeRO 2/3: nvme path for optimizer offload")
    g.add_argument("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"],
                   help="ZeRO 3: offload parameters to this device")
    g.add_argument("--offload_param_nvme_path", type=str, default=None, help="ZeRO 3: nvme path for parameter offload")
    g.add_argument("--zero3_init_flag", action="store_true", help="ZeRO 3: build the model with deepspeed.zero.Init")
    g.add_argument("--zero3_save_16bit_model", action="store_true", help="ZeRO 3: save a 16-bit model")
    g.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                   help="DeepSpeed fp16_master_weights_and_gradients")


def add_sd_saving_arguments(parser: Container) -> None:
    """Whole-model saving options of train_db.py and fine_tune.py (spec cli-options §7)."""
    g = section(parser, "model saving")
    g.add_argument("--save_model_as", type=str, default=None,
                   choices=[None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"],
                   help="format of the saved model (default: the same kind as the base model)")
    g.add_argument("--use_safetensors", action="store_true",
                   help="save as .safetensors when --save_model_as is not given")


def add_optimizer_arguments(parser: Container) -> None:
    """Optimizer and LR-schedule options (spec cli-options §8)."""
    g = section(parser, "optimizer and learning-rate schedule")
    g.add_argument("--optimizer_type", type=str, default="",
                   help="optimizer: AdamW (default), AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, "
                        "Lion, Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, DAdaptation, "
                        "DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, "
                        "AdaFactor, or any 'module.Class'")
    g.add_argument("--use_8bit_adam", action="store_true", help="legacy: same as --optimizer_type AdamW8bit")
    g.add_argument("--use_lion_optimizer", action="store_true", help="legacy: same as --optimizer_type Lion")
    ranged(g.add_argument("--learning_rate", type=float, default=2.0e-6, help="base learning rate (default: 2e-6)"),
           at_least(0))
    ranged(g.add_argument("--max_grad_norm", type=float, default=1.0,
                          help="clip the gradient norm to this (default: 1.0; 0 disables clipping)"),
           at_least(0, "0 = no clipping"))
    g.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                   help="extra optimizer arguments as key=value Python literals, e.g. weight_decay=0.01 "
                        "betas=0.9,0.999")
    g.add_argument("--lr_scheduler_type", type=str, default="",
                   help="custom scheduler class 'module.Class' (no module: torch.optim.lr_scheduler)")
    g.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                   help="extra scheduler arguments as key=value Python literals, e.g. T_max=100")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help="LR schedule: linear, cosine, cosine_with_restarts, polynomial, constant (default), "
                        "constant_with_warmup, adafactor")
    ranged(g.add_argument("--lr_warmup_steps", type=int, default=0,
                          help="linear warmup steps (default: 0; not allowed with the constant schedule)"),
           at_least(0, "a negative number of warmup steps has no meaning"))
    ranged(g.add_argument("--lr_scheduler_num_cycles", type=int, default=1,
                          help="number of restarts of cosine_with_restarts (default: 1)"), at_least(1))
    ranged(g.add_argument("--lr_scheduler_power", type=float, default=1,
                          help="power of the polynomial schedule (default: 1)"),
           at_least(0))


def add_custom_train_arguments(parser: Container, support_weighted_captions: bool = True) -> None:
    """Loss weighting options (spec cli-options §10)."""
    g = section(parser, "loss weighting")
    ranged(g.add_argument("--min_snr_gamma", type=float, default=None,
                          help="Min-SNR loss weighting with this gamma (5 is typical)"), at_least(0, "0 = off"))
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="scale the v-prediction loss like the noise-prediction loss (needs --v_parameterization)")
    ranged(g.add_argument("--v_pred_like_loss", type=float, default=None,
                          help="add a v-prediction-like loss with this weight (not with --v_parameterization)"),
           at_least(0, "0 = off"))
    g.add_argument("--debiased_estimation_loss", action="store_true", help="weight the loss by 1/sqrt(SNR)")
    if support_weighted_captions:
        g.add_argument("--weighted_captions", action="store_true", default=False,
                       help="enable '(tag:1.2)' weights in captions (SD 1.x/2.x only)")


def add_sdxl_training_arguments(parser: Container) -> None:
    """SDXL options of sdxl_train_network.py and sdxl_train.py (spec cli-options §11)."""
    g = section(parser, "SDXL")
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="compute both text encoders' outputs once, while they are frozen (sdxl_train_network: "
                        "--network_train_unet_only; sdxl_train: no --train_text_encoder); no caption "
                        "shuffling/dropout/warmup")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="cache text encoder outputs to <image>_te_outputs.npz; implies "
                        "--cache_text_encoder_outputs")


def build_parser(script: str) -> argparse.ArgumentParser:
    """The full parser of one trainer, groups as the table at the top of spec cli-options.md."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; expected one of {', '.join(SCRIPTS)}")
    parser = argparse.ArgumentParser(prog=f"{script}.py", description=_DESCRIPTIONS[script])
    script = SAME_PARSER.get(script, script)  # from here on: which groups the parser has
    dreambooth = script not in ("fine_tune",) + CONTROLNET_SCRIPTS
    add_logging_arguments(section(parser, "console log"))
    add_sd_models_arguments(parser)
    add_dataset_arguments(parser, support_dreambooth=dreambooth, support_caption=script != "train_db",
                          support_caption_dropout=script != "train_textual_inversion")
    # sdxl_train.py reads DreamBooth folders but has no --prior_loss_weight (sd-scripts v0.8.7)
    add_training_arguments(parser, support_dreambooth=dreambooth and script != "sdxl_train")
    if dreambooth:  # fine_tune.py has no masked loss (spec cli-options pitfall 5), nor have the ControlNet trainers
        add_masked_loss_arguments(parser)
    add_deepspeed_arguments(parser)
    if script in ("train_db", "fine_tune", "sdxl_train"):
        add_sd_saving_arguments(parser)
    add_optimizer_arguments(parser)
    add_config_arguments(parser)
    add_custom_train_arguments(parser, support_weighted_captions=script != "train_textual_inversion")
    own = {
        "train_network": add_network_trainer_arguments,
        "sdxl_train_network": add_network_trainer_arguments,
        FLUX_SCRIPT: add_network_trainer_arguments,
        "train_db": add_dreambooth_arguments,
        "fine_tune": add_finetune_arguments,
        "train_textual_inversion": add_textual_inversion_arguments,
        "sdxl_train": add_sdxl_train_arguments,
        "train_controlnet": add_controlnet_arguments,
        LLLITE_SCRIPT: add_lllite_arguments,
    }
    own[script](parser)
    if script in ("sdxl_train_network", "sdxl_train", LLLITE_SCRIPT):
        add_sdxl_training_arguments(parser)
    if script == FLUX_SCRIPT:
        add_flux_arguments(parser)
    add_beyond_arguments(parser)
    return parser


__all__ = [
    "SCRIPTS", "build_parser", "add_logging_arguments", "add_sd_models_arguments", "add_dataset_arguments",
    "add_training_arguments", "add_masked_loss_arguments", "add_deepspeed_arguments", "add_sd_saving_arguments",
    "add_optimizer_arguments", "add_config_arguments", "add_custom_train_arguments", "add_sdxl_training_arguments",
    "add_network_trainer_arguments", "add_dreambooth_arguments", "add_finetune_arguments",
    "add_textual_inversion_arguments", "add_sdxl_train_arguments", "add_beyond_arguments",
]


@functools.lru_cache(maxsize=1)
def _training_ranges() -> dict[str, Range]:
    out: dict[str, Range] = {}
    for script in SCRIPTS:
        out.update(ranges_of(build_parser(script)))
    return out


def range_of(dest: str) -> Optional[Range]:
    """The declared range of the training option ``dest`` (None when it has none); the dataset TOML keys
    share the ranges of the options they mirror."""
    return _training_ranges().get(dest)
