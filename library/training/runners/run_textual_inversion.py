"""train_textual_inversion.py: numbered steps from parsed options to a saved embedding (SD 1.x / 2.x).

spec cli-options §12 T, losses-and-noise §10, file-formats §c. SDXL embeddings belong to
sdxl_train_textual_inversion.py, which this project does not provide.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from typing import Optional

import torch

from library.errors import UserError
from library.formats.modelspec import modelspec_from_args, trained_resolution
from library.training.loop.checkpointing import Checkpointer, resume_state
from library.training.loop.train_loop import LoopHooks
from library.training.memory.device_memory import park_unused_models
from library.training.methods import ti_tokens
from library.training.methods.textual_inversion import TextualInversionMethod
from library.training.runners import accelerate_setup as setup
from library.training.runners import run_lock
from library.training.runners.checks import verify_training_args
from library.training.runners.preflight import preflight
from library.training.runners.run_common import (attach_tokenizers, build_data, cache_latents_if_asked,
                                                 encode_latents_fn, load_base_models, make_sample_hook,
                                                 optimizer_and_schedule, tracker_init, train_and_save)
from library.training.runners.run_extras import attach_extras

logger = logging.getLogger(__name__)

SCRIPT = "train_textual_inversion"


def run(args: argparse.Namespace) -> str:
    """Train a Textual Inversion embedding; returns the path of the final file."""
    # 1. options, seed, base model family
    _verify(args)
    run_lock.hold(args)  # one run per output name; --dry_run only checks
    if args.seed is None:  # sd-scripts leaves T unseeded; a drawn seed keeps that and makes the run repeatable
        args.seed = random.randint(0, 2**32 - 1)
    if getattr(args, "dry_run", False):
        from library.training.runners.dry_run import report

        return report(args, SCRIPT)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    _reject_sdxl(args.pretrained_model_name_or_path)
    # 2. data (scanned before any model loads), accelerator, models, new tokens
    group, _ = build_data(args, SCRIPT, sdxl=False)
    acc = setup.make_accelerator(args)
    wdtype = setup.weight_dtype(args)
    models = load_base_models(args, acc, wdtype, sdxl=False, train_text_encoder=True)
    te = models.text_encoders[0]
    strings, token_ids = _add_new_tokens(args, te, models.tokenizers[0])
    data_replacement, prompt_replacement = ti_tokens.caption_replacement(strings, args.use_object_template,
                                                                         args.use_style_template)
    attach_tokenizers(args, group, models)  # after add_tokens: captions tokenize with the new tokens
    if data_replacement:
        group.add_replacement(*data_replacement)
    cache_latents_if_asked(args, group, models, acc)
    # 3. what trains: the input embeddings only (old rows restored after each step)
    te.requires_grad_(False)
    te.get_input_embeddings().requires_grad_(True)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()  # diffusers only checkpoints in training mode
        te.gradient_checkpointing_enable()
    if args.full_fp16 or args.full_bf16:  # T casts without checking --mixed_precision (spec pitfall 12)
        te.to(wdtype)
    # 4. optimizer, scheduler, prepare
    optimizer, lr_sched, plan, _ = optimizer_and_schedule(args, [te.get_input_embeddings().weight], group, acc)
    prepared_te, optimizer, lr_sched = acc.prepare(te, optimizer, lr_sched)
    # 5. method, saving, sampling, resume
    method = TextualInversionMethod.from_args(models, args, acc, wdtype, token_ids)
    method.attach(prepared_te)
    method.save_dtype = setup.save_dtype(args)
    method.save_metadata = lambda: modelspec_from_args(args, models.family, "textual-inversion",
                                                       resolution=trained_resolution(group))
    ext = "." + (args.save_model_as or "pt")
    checkpointer = Checkpointer(args, acc, method.save, ext, plan.num_epochs)
    state = resume_state(acc, args)
    tracker_init(acc, args, "textual_inversion")
    replacer = (lambda s: s.replace(*prompt_replacement)) if prompt_replacement else None
    hooks = LoopHooks(sample=make_sample_hook(args, models, acc, wdtype, prompt_replacer=replacer))
    hooks = attach_extras(args, acc, SCRIPT, models, group, method, checkpointer, hooks,
                          encode_latents_fn(models, acc, args))  # validation, EMA, receipts
    hooks.sample = park_unused_models(args, models, acc, hooks.sample)  # after all caching
    # 6. train, final save
    return train_and_save(acc, method, group, args, optimizer, lr_sched, plan, checkpointer, state, hooks)


def _verify(args: argparse.Namespace) -> None:
    """Script checks (spec cli-options §12 T, §13); ``output_name`` defaults to the token string."""
    verify_training_args(args, SCRIPT)
    preflight(args, SCRIPT)
    if not args.token_string:
        raise UserError("--token_string is required (the new word the embedding is trained for)")
    if args.num_vectors_per_token < 1:
        raise UserError(f"--num_vectors_per_token must be at least 1, got {args.num_vectors_per_token}")
    if args.use_object_template and args.use_style_template:
        raise UserError("--use_object_template and --use_style_template exclude each other")
    if args.output_name is None:
        args.output_name = args.token_string


def _add_new_tokens(args: argparse.Namespace, te, tokenizer) -> tuple[list[str], list[int]]:
    """Tokens ``tok, tok1, …`` into the tokenizer, new embedding rows from --init_word / --weights (spec §12 T)."""
    strings = ti_tokens.token_strings(args.token_string, args.num_vectors_per_token)
    init_ids = ti_tokens.init_word_ids(tokenizer, args.init_word, args.num_vectors_per_token)
    weights = _initial_weights(args)  # read before touching the tokenizer: a bad file changes nothing
    token_ids = ti_tokens.add_tokens(tokenizer, strings)
    ti_tokens.grow_embeddings(te, tokenizer, token_ids, init_ids, weights)
    logger.info("tokens %s -> ids %s", strings, token_ids)
    return strings, token_ids


def _initial_weights(args: argparse.Namespace) -> Optional[torch.Tensor]:
    """--weights: the first tensor of an embedding file, 1-D as (1, d) (spec file-formats §c)."""
    if args.weights is None:
        return None
    from library.formats.ti_embedding import load_embedding

    logger.info("initial embedding from %s", args.weights)
    return load_embedding(args.weights, for_trainer=True)


def _reject_sdxl(path: Optional[str]) -> None:
    """SDXL models need sdxl_train_textual_inversion.py (two text encoders), which is not provided here."""
    if not path:
        raise UserError("--pretrained_model_name_or_path is required")
    if os.path.isdir(path):
        sdxl = os.path.isdir(os.path.join(path, "text_encoder_2"))
    elif os.path.isfile(path):
        from library.models.architectures import detect_family
        from library.models.checkpoint_io import CheckpointReader

        reader = CheckpointReader(path)
        try:
            sdxl = detect_family(reader.keys(), path) == "sdxl"
        finally:
            reader.close()
    else:
        return  # load_base_models names the missing path
    if sdxl:
        raise UserError(f"{path} is an SDXL model: SDXL embeddings need sdxl_train_textual_inversion.py, "
                        "which this project does not provide; train_textual_inversion.py takes SD 1.x / 2.x")
