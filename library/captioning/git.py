"""GIT captions through transformers' `AutoProcessor` + `GitForCausalLM` (sd-scripts' make_captions_by_git.py).

Options as upstream: `--model_id` (default `microsoft/git-large-textcaps`), `--max_length` 50, greedy decoding,
`--remove_words` to drop the text-reading phrases ("with the words xxx", "that says xxx", ...) the TextCaps model
invents often. Offline, download the model into a folder and pass that folder as `--model_id`.
"""
from __future__ import annotations

import argparse
import logging
import re

import torch
from PIL import Image

from library.captioning.caption_loop import caption_images, check_batch_options
from library.captioning.pretrained import default_device, load_pretrained
from library.errors import UserError
from library.tagging.image_list import glob_images

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "microsoft/git-large-textcaps"

# sd-scripts' PATTERN_REPLACE, in its order: each match is deleted. They target the TextCaps habit of
# reading (often imaginary) text: `with the words "xxx" on it`, `a sign that says xxx`, `the number 5 on it`.
PATTERN_REPLACE = [
    re.compile(r'(has|with|and) the (words?|letters?|name) (" ?[^"]*"|\w+)( ?(is )?(on|in) (the |her |their |him )?\w+)?'),
    re.compile(r'(with a sign )?that says ?(" ?[^"]*"|\w+)( ?on it)?'),
    re.compile(r"(with a sign )?that says ?(' ?(i'm)?[^']*'|\w+)( ?on it)?"),
    re.compile(r"with the number \d+ on (it|\w+ \w+)"),
    re.compile(r'with the words "'),
    re.compile(r"word \w+ on it"),
    re.compile(r"that says the word \w+ on it"),
    re.compile("that says'the word \"( on it)?"),
]
_SPACES = re.compile(r"\s{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?])")


def remove_words(caption: str) -> str:
    """Delete every `PATTERN_REPLACE` match, then tidy the spaces the deletions leave.

    Upstream keeps those spaces ("a sign  on a wall", trailing blanks); collapsing them changes nothing
    a tokenizer sees, and the caption files read cleanly.
    """
    for pattern in PATTERN_REPLACE:
        caption = pattern.sub("", caption)
    caption = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", caption))
    return caption.strip(" ,")


class GitCaptioner:
    """Callable: list of RGB images -> captions (greedy, `max_length` tokens, optional `remove_words`)."""

    def __init__(self, processor, model, max_length: int, remove: bool, device: torch.device, debug: bool = False):
        self.processor = processor
        self.model = model.to(device).eval()
        self.max_length = max_length
        self.remove = remove
        self.device = device
        self.debug = debug

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt")
        ids = self.model.generate(pixel_values=inputs["pixel_values"].to(self.device), max_length=self.max_length)
        captions = [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        if not self.remove:
            return captions
        cleaned = [remove_words(c) for c in captions]
        if self.debug:
            for before, after in zip(captions, cleaned):
                if before != after:
                    logger.info(f"--remove_words: {before!r} -> {after!r}")
        return cleaned


def load_git(source: str):
    """`(processor, model)` from a transformers folder or hub id (UserError with a download hint)."""
    from transformers import AutoModelForCausalLM, AutoProcessor  # start-up (transformers: ~1 s)

    def load(src: str):
        return AutoProcessor.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src)

    return load_pretrained(source, load, "--model_id", DEFAULT_MODEL_ID)


def run_make_captions_by_git(args: argparse.Namespace) -> int:
    """Caption every image under `args.train_data_dir` with GIT; return the number of files written."""
    # 1. options and images (checked before loading the model)
    if args.max_length < 1:
        raise UserError(f"--max_length must be at least 1, got {args.max_length}")
    check_batch_options(args.batch_size, args.max_data_loader_n_workers)
    image_paths = glob_images(args.train_data_dir, args.recursive)
    logger.info(f"found {len(image_paths)} images.")
    if not image_paths:
        logger.warning(f"no images in {args.train_data_dir}: nothing to caption")
        return 0

    # 2. model
    device = default_device()
    logger.info(f"loading GIT: {args.model_id}")
    processor, model = load_git(args.model_id)
    captioner = GitCaptioner(processor, model, args.max_length, args.remove_words, device, args.debug)

    # 3. caption
    written = caption_images(image_paths, captioner, args.caption_extension, args.batch_size,
                             args.max_data_loader_n_workers, args.debug)
    logger.info("done!")
    return written
