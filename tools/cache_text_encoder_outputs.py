#!/usr/bin/env python
"""Cache SDXL text-encoder outputs to disk with the training dataset machinery, before training.

Builds the datasets exactly as a trainer does (``--dataset_config``, DreamBooth folders or ``--in_json``;
``--config_file`` honoured) and writes the ``<image>_te_outputs.npz`` files (``hidden_state1``,
``hidden_state2``, ``pool2``) that ``sdxl_train_network.py`` / ``sdxl_train.py`` with
``--cache_text_encoder_outputs_to_disk`` read instead of running the text encoders (spec dataset-config
§10.1): each image's raw caption, encoded by the same function the trainers use, in the training dtype
(``--mixed_precision``) and with ``--max_token_length``. Without ``--skip_existing`` every file is written
again; with it, existing files are kept (as the trainers do).

Deviations: one process (CUDA when available, else CPU) instead of sd-scripts' accelerate split;
``--dataset_class`` is refused (a user's class has no image files to write next to).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

from library.config.options import add_sdxl_training_arguments  # noqa: E402
from library.config.options_common import section  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402
from tools.cache_latents import caching_parser, dataset_groups, run_tool  # noqa: E402

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """sd models + training + dataset + --dataset_config + SDXL groups, plus --sdxl and --skip_existing."""
    parser = caching_parser(__doc__)
    add_sdxl_training_arguments(parser)
    g = section(parser, "cache_text_encoder_outputs", "options of this tool")
    g.add_argument("--sdxl", action="store_true",
                   help="the model is SDXL (required: only SDXL trainers read the cache)")
    g.add_argument("--skip_existing", action="store_true",
                   help="keep existing <image>_te_outputs.npz files instead of encoding their captions again")
    return parser


setup_parser = build_parser  # sd-scripts' name for it (wrappers import it)


def check_args(args: argparse.Namespace) -> None:
    """sd-scripts' two assertions, and the input files, before anything loads."""
    if not args.cache_text_encoder_outputs_to_disk:
        raise UserError("--cache_text_encoder_outputs_to_disk is required: this tool only writes the cache to disk")
    if not args.sdxl:
        raise UserError("--sdxl is required: text-encoder outputs are cached for SDXL only")
    if args.v2:
        raise UserError("--sdxl and --v2 cannot be used together")
    if args.dataset_class:
        raise UserError("--dataset_class cannot be used with this tool: a user's class has no image files to "
                        "write the cache next to")
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required")
    path = args.pretrained_model_name_or_path
    if not os.path.exists(path):
        raise UserError(f"--pretrained_model_name_or_path: no such file or folder: {path}")


def build_groups(args: argparse.Namespace) -> list:
    """The trainers' dataset groups (training and validation) for this command line / config; captions that
    change between steps (shuffle, dropout, warmup) are refused as the trainers refuse them."""
    return dataset_groups(args, "cache_text_encoder_outputs", [], True, te_cache_expected=True)


def load_encoder(args: argparse.Namespace):
    """The trainers' cache encoder (``run_common.encode_text_fn``) on both text encoders, frozen, in the
    training dtype on the accelerator's device; the U-Net and VAE are dropped once loaded."""
    import torch

    from library.models.loading import load_models  # start-up (diffusers, transformers)
    from library.training.runners import accelerate_setup as setup
    from library.training.runners.run_common import encode_text_fn

    acc = setup.make_accelerator(args)
    wdtype = setup.weight_dtype(args)
    models = load_models(args.pretrained_model_name_or_path, sdxl=True, dtype=torch.float32,
                         tokenizer_cache_dir=args.tokenizer_cache_dir)
    models.unet = models.vae = None  # only the text encoders are needed
    for te in models.text_encoders:
        te.requires_grad_(False)
        te.eval()
        te.to(acc.device, wdtype)
    return encode_text_fn(models, acc, args, wdtype)


def cache(args: argparse.Namespace) -> None:
    """1. check  2. datasets (before the model: bad data fails fast)  3. text encoders  4. encode, write npz."""
    from library.data.te_cache import cache_text_encoder_outputs

    check_args(args)
    groups = build_groups(args)
    encode = load_encoder(args)
    for group in groups:
        cache_text_encoder_outputs(group, encode, to_disk=True, overwrite=not args.skip_existing)
    logger.info("text encoder outputs cached")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    run_tool(build_parser, cache, argv)


if __name__ == "__main__":
    main()
