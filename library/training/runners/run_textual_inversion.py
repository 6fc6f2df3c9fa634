"""train_textual_inversion.py (SD 1.x / 2.x) and sdxl_train_textual_inversion.py (SDXL) as one recipe of the
shared runner (recipe.py): an embedding, trained in every text encoder of the model.

spec cli-options §12 T, losses-and-noise §10, file-formats §c. SDXL: the same tokens are added to both
tokenizers, both encoders' new rows train, and the file holds ``clip_l`` (TE1) and ``clip_g`` (TE2).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Optional

import torch

from library.errors import UserError
from library.formats.modelspec import modelspec_from_options, trained_resolution
from library.formats.ti_embedding import load_embedding, load_sdxl_embedding
from library.models.architectures import detect_family
from library.models.checkpoint_io import CheckpointReader
from library.training.loop.checkpointing import Checkpointer
from library.training.methods import ti_tokens
from library.training.methods.textual_inversion import TextualInversionMethod
from library.training.runners import accelerate_setup as setup
from library.training.runners.recipe import Recipe, RecipeRun, Training, run_recipe
from library.training.runners.run_common import optimizer_and_schedule
from library.training.runners.run_network import verify_sdxl_base

logger = logging.getLogger(__name__)



class TextualInversionRecipe(Recipe):
    """New token rows of the text encoders' input embeddings train; everything else is frozen."""

    tracker = "textual_inversion"

    def __init__(self, sdxl: bool = False):
        self.sdxl = sdxl
        self.script = "sdxl_train_textual_inversion" if sdxl else "train_textual_inversion"
        self.token_ids: list[list[int]] = []  # per text encoder
        self.weights: list[Optional[torch.Tensor]] = []  # --weights per text encoder, read before any model loads
        self.prompt_replacement: Optional[tuple[str, str]] = None

    def check_options(self, args: argparse.Namespace) -> None:
        """Script checks (spec cli-options §12 T, §13); ``output_name`` defaults to the token string."""
        if not args.token_string:
            raise UserError("--token_string is required (the new word the embedding is trained for)")
        if args.num_vectors_per_token < 1:
            raise UserError(f"--num_vectors_per_token must be at least 1, got {args.num_vectors_per_token}")
        if args.use_object_template and args.use_style_template:
            raise UserError("--use_object_template and --use_style_template exclude each other")
        if self.sdxl:
            verify_sdxl_base(args)  # the model's family is checked by preflight (an SDXL model is required)
        else:
            _reject_sdxl(args.pretrained_model_name_or_path)
        self.weights = _initial_weights(args, 2 if self.sdxl else 1)

    def trains(self, args: argparse.Namespace) -> tuple[bool, bool]:
        return False, True

    def after_load(self, run: RecipeRun) -> None:
        """The new tokens, before the captions are tokenized; their caption and prompt replacements."""
        strings, self.token_ids = _add_new_tokens(run.args, run.models.text_encoders, run.models.tokenizers,
                                                  self.weights)
        data_replacement, self.prompt_replacement = ti_tokens.caption_replacement(
            strings, run.args.use_object_template, run.args.use_style_template)
        if data_replacement:
            run.group.add_replacement(*data_replacement)

    def prepare(self, run: RecipeRun) -> Training:
        args, acc, models, wdtype = run.args, run.acc, run.models, run.wdtype
        tes = list(models.text_encoders)
        for te in tes:
            te.requires_grad_(False)  # only the input embeddings train (old rows restored after each step)
            te.get_input_embeddings().requires_grad_(True)
            if args.gradient_checkpointing:
                te.gradient_checkpointing_enable()
            if args.full_fp16 or args.full_bf16:  # T casts without checking --mixed_precision (spec pitfall 12)
                te.to(wdtype)
        if args.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            models.unet.train()  # diffusers only checkpoints in training mode
        # one parameter group holding every encoder's table, as upstream: one learning rate for both
        embeddings = [te.get_input_embeddings().weight for te in tes]
        optimizer, lr_sched, plan, _ = optimizer_and_schedule(args, run.settings.loop, embeddings, run.group, acc)
        *prepared_tes, optimizer, lr_sched = acc.prepare(*tes, optimizer, lr_sched)
        method = TextualInversionMethod.from_settings(models, run.settings, acc, wdtype, self.token_ids)
        method.attach(prepared_tes)
        method.save_dtype = setup.save_dtype(args)
        method.save_metadata = lambda: modelspec_from_options(run.settings.options, models.family, "textual-inversion",
                                                              resolution=trained_resolution(run.group))
        ext = "." + (args.save_model_as or "pt")
        checkpointer = Checkpointer(run.settings.saving, acc, method.save, ext, plan.num_epochs, plan.max_train_steps,
                                    run.settings.hub)
        return Training(method, optimizer, lr_sched, plan, checkpointer)

    def prompt_replacer(self) -> Optional[Callable[[str], str]]:
        replacement = self.prompt_replacement
        return (lambda s: s.replace(*replacement)) if replacement else None


def run(args: argparse.Namespace, sdxl: bool = False) -> Optional[str]:
    """Train a Textual Inversion embedding; returns the path of the final file (None after ``--dry_run``)."""
    return run_recipe(args, TextualInversionRecipe(sdxl))


def _add_new_tokens(args: argparse.Namespace, tes: list, tokenizers: list,
                    weights: list[Optional[torch.Tensor]]) -> tuple[list[str], list[list[int]]]:
    """Tokens ``tok, tok1, …`` into every tokenizer, new embedding rows of every text encoder from --init_word
    (each tokenizer's own ids) / ``weights`` (spec §12 T); returns the strings and each encoder's new ids."""
    strings = ti_tokens.token_strings(args.token_string, args.num_vectors_per_token)
    init_ids = [ti_tokens.init_word_ids(tok, args.init_word, args.num_vectors_per_token) for tok in tokenizers]
    for tok in tokenizers:  # every token must be new in every tokenizer before any is changed
        ti_tokens.check_new(tok, strings)
    token_ids = []
    for i, (te, tok) in enumerate(zip(tes, tokenizers)):
        ids = ti_tokens.add_tokens(tok, strings)
        ti_tokens.grow_embeddings(te, tok, ids, init_ids[i], weights[i])
        logger.info("tokens %s -> ids %s (text encoder %d)", strings, ids, i + 1)
        token_ids.append(ids)
    return strings, token_ids


def _initial_weights(args: argparse.Namespace, n_encoders: int) -> list[Optional[torch.Tensor]]:
    """--weights per text encoder: SD the first tensor of an embedding file, 1-D as (1, d); SDXL its ``clip_l``
    and ``clip_g``, both needed (spec file-formats §c). Read before any model loads, so a wrong file or vector
    count stops the run at once (the width is checked against the encoder once it is loaded)."""
    if args.weights is None or not os.path.isfile(args.weights):
        return [None] * n_encoders  # a missing file: preflight names it

    logger.info("initial embedding from %s", args.weights)
    if n_encoders == 1:
        named = [("its first tensor", load_embedding(args.weights, for_trainer=True))]
    else:
        clip_l, clip_g = load_sdxl_embedding(args.weights, for_trainer=True)
        if clip_l is None or clip_g is None:
            missing = "clip_l" if clip_l is None else "clip_g"
            raise UserError(f"--weights {args.weights}: an SDXL embedding needs both clip_l and clip_g; {missing} "
                            "is missing")
        named = [("clip_l", clip_l), ("clip_g", clip_g)]
    for name, t in named:
        if t.shape[0] != args.num_vectors_per_token:
            raise UserError(f"--weights {args.weights}: {name} holds {t.shape[0]} vectors, but "
                            f"--num_vectors_per_token is {args.num_vectors_per_token}")
    return [t for _, t in named]


def _reject_sdxl(path: Optional[str]) -> None:
    """SDXL models need sdxl_train_textual_inversion.py (two text encoders)."""
    if not path:
        raise UserError("--pretrained_model_name_or_path is required")
    if os.path.isdir(path):
        sdxl = os.path.isdir(os.path.join(path, "text_encoder_2"))
    elif os.path.isfile(path):
        reader = CheckpointReader(path)
        try:
            sdxl = detect_family(reader.keys(), path) == "sdxl"
        finally:
            reader.close()
    else:
        return  # load_base_models names the missing path
    if sdxl:
        raise UserError(f"{path} is an SDXL model: SDXL embeddings are trained by sdxl_train_textual_inversion.py "
                        "(same options); train_textual_inversion.py takes SD 1.x / 2.x")
