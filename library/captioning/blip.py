"""BLIP captions through transformers' `BlipForConditionalGeneration` (spec utilities §1).

sd-scripts runs the original BLIP repository code on `model_large_caption.pth`. That file cannot be read by
transformers (and needs a download), so the default `--caption_weights` URL is mapped to the same model
converted to transformers format, `Salesforce/blip-image-captioning-large` (BLIP-large captioning, ViT-L,
384x384, bicubic resize, CLIP mean/std, BERT tokenizer). Offline, download that repository into a folder
and pass the folder. The generation settings follow the original: decoder prompt "a picture of ",
nucleus sampling with repetition_penalty 1.1, or beam search with repetition_penalty 1.0.
"""
from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from library.captioning.caption_loop import caption_images, check_batch_options
from library.captioning.pretrained import default_device, load_pretrained
from library.errors import UserError
from library.tagging.image_list import glob_images

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_WEIGHTS = ("https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
                           "model_large_caption.pth")
DEFAULT_HUB_MODEL = "Salesforce/blip-image-captioning-large"
PROMPT = "a picture of "


@dataclass(frozen=True)
class BlipGenerationOptions:
    """Decoding settings of sd-scripts' BLIP call (`sample=not beam_search`)."""

    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BlipGenerationOptions":
        return cls(args.beam_search, args.num_beams, args.top_p, args.max_length, args.min_length)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `generate`; lengths count the prompt tokens, as in the original BLIP."""
        common = dict(max_length=self.max_length, min_length=self.min_length)
        if self.beam_search:
            return dict(common, num_beams=self.num_beams, do_sample=False, repetition_penalty=1.0)
        return dict(common, do_sample=True, top_p=self.top_p, num_beams=1, repetition_penalty=1.1)


def check_options(opts: BlipGenerationOptions) -> None:
    """Reject values `generate` would fail on later (or silently misread)."""
    if opts.num_beams < 1:
        raise UserError(f"--num_beams must be at least 1, got {opts.num_beams}")
    if not 0.0 < opts.top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {opts.top_p}")
    if opts.min_length < 0 or opts.max_length < 1 or opts.min_length > opts.max_length:
        raise UserError(f"--min_length {opts.min_length} / --max_length {opts.max_length}: need "
                        "0 <= min_length <= max_length and max_length >= 1")
    if opts.num_beams > 1 and not opts.beam_search:
        logger.warning(f"--num_beams {opts.num_beams} is ignored without --beam_search (nucleus sampling is used)")


def strip_prompt(caption: str, prompt: str = PROMPT) -> str:
    """Remove the decoder prompt from a decoded caption (the original slices `caption[len(prompt):]`).

    Only strips when the caption really starts with the prompt, so a tokenizer that normalises spaces
    differently never loses the first word.
    """
    if caption.startswith(prompt):
        return caption[len(prompt):].strip()
    if caption.startswith(prompt.rstrip()):
        return caption[len(prompt.rstrip()):].strip()
    return caption.strip()


def resolve_caption_weights(value: str) -> str:
    """Map sd-scripts' default `.pth` URL to the transformers model; refuse other original-BLIP files."""
    if value == DEFAULT_CAPTION_WEIGHTS:
        logger.info(f"--caption_weights: the original BLIP checkpoint is replaced by its transformers "
                    f"conversion {DEFAULT_HUB_MODEL}")
        return DEFAULT_HUB_MODEL
    if "://" in value or value.lower().endswith((".pth", ".pt")):
        raise UserError(f"--caption_weights {value}: original BLIP checkpoints (.pth) are not supported; pass a "
                        f"transformers-format BLIP folder or hub id, e.g. {DEFAULT_HUB_MODEL}")
    return value


class BlipCaptioner:
    """Callable: list of RGB images -> captions without the prompt."""

    def __init__(self, processor, model, opts: BlipGenerationOptions, device: torch.device):
        self.processor = processor
        self.model = model.to(device).eval()
        self.opts = opts
        self.device = device

    @torch.no_grad()
    def generate_ids(self, images: list[Image.Image]) -> torch.Tensor:
        """Token ids of the prompt plus the generated caption, one row per image."""
        inputs = self.processor(images=images, text=[PROMPT] * len(images), return_tensors="pt")
        # the model drops the prompt's trailing [SEP] and swaps [CLS] for its decoder-start token
        return self.model.generate(pixel_values=inputs["pixel_values"].to(self.device),
                                   input_ids=inputs["input_ids"].to(self.device),
                                   **self.opts.generate_kwargs())

    def __call__(self, images: list[Image.Image]) -> list[str]:
        ids = self.generate_ids(images)
        return [strip_prompt(c) for c in self.processor.batch_decode(ids, skip_special_tokens=True)]


def load_blip(source: str):
    """`(processor, model)` from a transformers folder or hub id (UserError with a download hint)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor  # start-up (transformers: ~1 s)

    def load(src: str):
        return BlipProcessor.from_pretrained(src), BlipForConditionalGeneration.from_pretrained(src)

    return load_pretrained(source, load, "--caption_weights", DEFAULT_HUB_MODEL)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random, as sd-scripts does once before captioning."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_make_captions(args: argparse.Namespace) -> int:
    """Caption every image under `args.train_data_dir` with BLIP; return the number of files written."""
    # 1. options and images (checked before loading the model)
    opts = BlipGenerationOptions.from_args(args)
    check_options(opts)
    check_batch_options(args.batch_size, args.max_data_loader_n_workers)
    image_paths = glob_images(args.train_data_dir, args.recursive)
    logger.info(f"found {len(image_paths)} images.")
    if not image_paths:
        logger.warning(f"no images in {args.train_data_dir}: nothing to caption")
        return 0

    # 2. model
    seed_everything(args.seed)
    device = default_device()
    source = resolve_caption_weights(args.caption_weights)
    logger.info(f"loading BLIP caption model: {source}")
    processor, model = load_blip(source)
    captioner = BlipCaptioner(processor, model, opts, device)

    # 3. caption
    written = caption_images(image_paths, captioner, args.caption_extension, args.batch_size,
                             args.max_data_loader_n_workers, args.debug)
    logger.info("done!")
    return written
