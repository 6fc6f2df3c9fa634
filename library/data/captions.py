"""Per-sample caption processing: prefix/suffix, dropout, wildcards, keep tokens, shuffle, tag dropout.

Follows sd-scripts' ``BaseDataset.process_caption`` step by step (spec dataset-config §8). Random
choices come from an explicit ``random.Random`` and are drawn in sd-scripts' order, so one seed
gives one caption sequence.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass
class CaptionOptions:
    """The caption settings of one subset (spec dataset-config §2.1, defaults §3)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0


def resolve_warmup_steps(token_warmup_step: float, max_train_steps: int) -> float:
    """A value below 1 is a fraction of ``max_train_steps``, floored (spec dataset-config §8 step 4)."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return token_warmup_step


def add_prefix_suffix(caption: str, prefix: str | None, suffix: str | None) -> str:
    """Step 1: ``prefix + " " + caption + " " + suffix``; empty values add nothing (spec §8)."""
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    return caption


def is_dropped(opts: CaptionOptions, epoch: int, rng: random.Random) -> bool:
    """Step 2: whole-caption dropout by rate or every N-th (1-based) epoch (spec §8)."""
    # the random draw happens only when a rate is set, keeping sd-scripts' draw order
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every = opts.caption_dropout_every_n_epochs
    return dropped or (every > 0 and epoch % every == 0)


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Step 3 with wildcards: pick a line, then replace each ``{a|b}``; ``{{``/``}}`` are literal (spec §8)."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # placeholders that cannot occur in the text protect escaped braces
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def split_tags(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """Step 4 split into fixed head, flexible tags and fixed tail (spec dataset-config §8)."""
    sep, keep_sep = opts.caption_separator, opts.keep_tokens_separator

    def pieces(text: str) -> list[str]:
        return [t.strip() for t in text.split(sep) if t.strip()]

    if keep_sep and keep_sep in caption:
        head, flexible = caption.split(keep_sep, 1)
        tail = ""
        if keep_sep in flexible:  # a second separator pins a tail; later ones stay in the tail
            flexible, tail = flexible.split(keep_sep, 1)
        return pieces(head), pieces(flexible), pieces(tail)
    tokens = [t.strip() for t in caption.strip().split(sep)]  # empty pieces kept here, as sd-scripts
    if opts.keep_tokens > 0:
        return tokens[: opts.keep_tokens], tokens[opts.keep_tokens:], []
    return [], tokens, []


def warmup_tags(flexible: list[str], opts: CaptionOptions, warmup_steps: float, step: int) -> list[str]:
    """Token warmup: keep the first tags only, growing linearly to all at ``warmup_steps`` (spec §8)."""
    if warmup_steps and step < warmup_steps:
        count = math.floor(step * ((len(flexible) - opts.token_warmup_min) / warmup_steps)) + opts.token_warmup_min
        return flexible[:count]
    return flexible


def drop_tags(tags: list[str], rate: float, rng: random.Random) -> list[str]:
    """Tag dropout: keep each tag iff ``random() >= rate`` (spec dataset-config §8)."""
    if rate <= 0:
        return tags
    return [t for t in tags if rng.random() >= rate]


def apply_replacements(caption: str, replacements: Mapping[str, str | Sequence[str]],
                       rng: random.Random) -> str:
    """Step 6 (Textual Inversion): ``""`` replaces the whole caption, else plain substitution (spec §8)."""
    for source, target in replacements.items():
        if source == "":
            caption = rng.choice(target) if isinstance(target, list) else target
        else:
            caption = caption.replace(source, target)
    return caption


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, *, epoch: int = 0,
                    step: int = 0, max_train_steps: int = 0,
                    replacements: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """One sample's caption for this step, steps 1-6 in sd-scripts' order (spec dataset-config §8).

    ``epoch`` is the 1-based training epoch and ``step`` the global step, as the dataset sees them.
    """
    # 1. prefix / suffix
    caption = add_prefix_suffix(caption, opts.caption_prefix, opts.caption_suffix)
    # 2. caption dropout: an empty caption skips everything else
    if is_dropped(opts, epoch, rng):
        return ""
    # 3. wildcards, or the first line only
    caption = expand_wildcards(caption, rng) if opts.enable_wildcard else caption.split("\n")[0]
    # 4. tag processing, only when one of its features is on
    warmup_steps = resolve_warmup_steps(opts.token_warmup_step, max_train_steps)
    if opts.shuffle_caption or warmup_steps > 0 or opts.caption_tag_dropout_rate > 0:
        head, flexible, tail = split_tags(caption, opts)
        flexible = warmup_tags(flexible, opts, warmup_steps, step)
        if opts.shuffle_caption:
            rng.shuffle(flexible)
        flexible = drop_tags(flexible, opts.caption_tag_dropout_rate, rng)
        caption = ", ".join(head + flexible + tail)  # always ", " whatever caption_separator is
    # 5. secondary separator becomes the bare caption separator, after shuffling
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    # 6. Textual Inversion token replacements
    if replacements:
        caption = apply_replacements(caption, replacements, rng)
    return caption
