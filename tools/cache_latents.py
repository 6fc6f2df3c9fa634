#!/usr/bin/env python
"""Cache VAE latents to disk with the training dataset machinery, before training (spec utilities §14).

Builds the datasets exactly as a trainer does (``--dataset_config``, DreamBooth folders or ``--in_json``;
``--config_file`` honoured) and writes the ``<image>.npz`` files that training with
``--cache_latents_to_disk`` reuses (spec dataset-config §10), ``--vae_batch_size`` images per bucket
batch. Without ``--skip_existing`` every file is re-encoded; with it, files that pass the training
reuse test are kept.

Deviations: one process (the device is CUDA when available, else CPU) instead of sd-scripts'
accelerate split; only the tokenizers and the VAE are loaded, not the whole model.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

import torch  # noqa: E402

from library.config.options import (add_config_arguments, add_dataset_arguments, add_sd_models_arguments,  # noqa: E402
                                    add_training_arguments)
from library.config.options_common import section  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402

logger = logging.getLogger(__name__)

VAE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def caching_parser(description: str) -> argparse.ArgumentParser:
    """The option groups the caching tools share with the trainers: sd models, training, dataset, config."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logging_arguments(section(parser, "console log"))
    add_sd_models_arguments(parser)
    add_training_arguments(parser, support_dreambooth=True)
    add_dataset_arguments(parser, support_dreambooth=True, support_caption=True, support_caption_dropout=True)
    add_config_arguments(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """sd models + training + dataset + --dataset_config groups, plus this tool's own options (§14)."""
    parser = caching_parser(__doc__)
    g = section(parser, "cache_latents", "options of this tool")
    g.add_argument("--sdxl", action="store_true", help="the model is SDXL (bucket steps must be multiples of 32)")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 even with --mixed_precision")
    g.add_argument("--skip_existing", action="store_true",
                   help="keep npz files that pass the training reuse test instead of re-encoding them")
    return parser


setup_parser = build_parser  # sd-scripts' name for it (wrappers import it)


def family_of(args: argparse.Namespace) -> str:
    return "sdxl" if args.sdxl else ("sd2" if args.v2 else "sd1")


def load_encoder(args: argparse.Namespace, family: str):
    """``encode(images in [-1,1]) -> unscaled latent samples`` from ``--vae`` or the base model's VAE."""
    from library.models.loading import load_vae

    source = args.vae or args.pretrained_model_name_or_path
    dtype = torch.float32 if args.no_half_vae else VAE_DTYPES[args.mixed_precision or "no"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_vae(source, family, torch.float32).to(device, dtype).eval()
    gen = torch.Generator(device=device).manual_seed(args.seed or 0)  # as the trainers' cache encoder

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(images.to(device, dtype)).latent_dist.sample(generator=gen).float().cpu()

    return encode


def build_group(args: argparse.Namespace, family: str):
    """The trainers' dataset group (validation included) for this command line / config."""
    import os

    from library.models.tokenizers import load_tokenizers

    folder = args.pretrained_model_name_or_path if os.path.isdir(args.pretrained_model_name_or_path) else None
    tokenizers = load_tokenizers(family, folder, args.tokenizer_cache_dir)
    return dataset_groups(args, "cache_latents", tokenizers, family == "sdxl", latents_cache_expected=True)


def dataset_groups(args: argparse.Namespace, script: str, tokenizers: list, sdxl: bool, **expected) -> list:
    """The trainers' dataset groups for this command line / config: training, then validation when a subset holds
    images out. ``expected``: the cache checks of ``build_dataset_group`` (``latents_cache_expected``, ...)."""
    from library.config.dataset_blueprint import dataset_params_from_args
    from library.data.dataset import build_dataset_group

    params = dataset_params_from_args(args, script)
    common = dict(seed=args.seed, max_train_steps=args.max_train_steps, max_token_length=args.max_token_length,
                  **expected)
    group = build_dataset_group(params, tokenizers, **common)
    if sdxl:
        group.verify_bucket_reso_steps(32)
    validation = build_dataset_group(params, tokenizers, part="validation", **common)
    return [group] + ([validation] if validation is not None else [])


def check_args(args: argparse.Namespace) -> None:
    import os

    if not args.cache_latents_to_disk:
        raise UserError("--cache_latents_to_disk is required: this tool only writes latents to disk")
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required")
    for option, path in (("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                         ("--vae", args.vae)):
        if path is not None and not os.path.exists(path):
            raise UserError(f"{option}: no such file or folder: {path}")
    if args.sdxl and args.v2:
        raise UserError("--sdxl and --v2 cannot be used together")


def cache(args: argparse.Namespace) -> None:
    """1. check  2. datasets (before the VAE: bad data fails fast)  3. VAE  4. encode and write npz."""
    from library.data.latent_cache import cache_latents

    check_args(args)
    family = family_of(args)
    groups = build_group(args, family)
    encode = load_encoder(args, family)
    for group in groups:
        cache_latents(group, encode, args.vae_batch_size, to_disk=True, skip_existing=args.skip_existing,
                      overwrite=not args.skip_existing)
    logger.info("latents cached")


def run_tool(build: Callable[[], argparse.ArgumentParser], work: Callable[[argparse.Namespace], None],
             argv: list[str] | None) -> None:
    """Parse (``--config_file`` honoured), set up logging, run: the caching tools' ``main``."""
    from library.config.config_file import parse_args_with_config

    args = parse_args_with_config(build(), argv)
    setup_logging_from_args(args)
    work(args)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    run_tool(build_parser, cache, argv)


if __name__ == "__main__":
    main()
