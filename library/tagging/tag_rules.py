"""WD14 tag assembly rules: pure functions, no model, no files (spec utilities §2).

The order of operations and the quirks (reverse order of `--always_first_tags`, unstripped
always-first entries, rating front-insertion winning over last-tag) are sd-scripts v0.8.7's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from library.errors import UserError

logger = logging.getLogger(__name__)

# Placeholders for escaped `\,` and `\;` in --tag_replacement (as sd-scripts; unlikely in tag names).
_ESC_COMMA = "@@@@"
_ESC_SEMI = "####"


@dataclass
class Labels:
    """Tag names per category, in CSV order; model outputs are `[rating…, general…, character…]`."""

    rating: list[str]
    general: list[str]
    character: list[str]

    def __len__(self) -> int:
        return len(self.rating) + len(self.general) + len(self.character)


@dataclass
class TagOptions:
    """The options that shape one caption (spec §2 table, resolved values)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    caption_separator: str = ", "
    undesired_tags: frozenset[str] = frozenset()
    character_tags_first: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    always_first_tags: list[str] | None = None


@dataclass
class TagResult:
    """One image's tags in output order, plus the per-category texts `--debug` logs."""

    tags: list[str]
    rating: str = ""
    general: list[str] = field(default_factory=list)
    character: list[str] = field(default_factory=list)


def expand_character_tag(tag: str, separator: str) -> str:
    """`name_(series)` → `name<sep>series`; `name_(costume)_(series)` → `name_(costume)<sep>series`."""
    if not tag.endswith(")"):
        return tag
    pieces = tag.split("(")
    name = "(".join(pieces[:-1])
    if name.endswith("_"):
        name = name[:-1]
    return name + separator + pieces[-1].replace(")", "")


def remove_underscore(tag: str) -> str:
    """`_` → space, but only for tags longer than 3 characters so emoticons like `^_^` survive."""
    return tag.replace("_", " ") if len(tag) > 3 else tag


def parse_tag_replacement(spec: str) -> list[tuple[str, str]]:
    """`src1,dst1;src2,dst2` with `\\,` and `\\;` as literal characters → [(src, dst), …]."""
    escaped = spec.replace("\\,", _ESC_COMMA).replace("\\;", _ESC_SEMI)
    pairs = []
    for entry in escaped.split(";"):
        parts = entry.split(",")
        if len(parts) != 2:
            raise UserError(f"--tag_replacement must be `source,target;source,target…`, got {spec!r}")
        src, dst = (p.replace(_ESC_COMMA, ",").replace(_ESC_SEMI, ";") for p in parts)
        pairs.append((src, dst))
    return pairs


def prepare_labels(labels: Labels, separator: str, character_tag_expand: bool = False,
                   underscore_to_space: bool = False, tag_replacement: str | None = None) -> Labels:
    """Rewrite the label names once, before tagging: expand → underscores → replacements (spec §2)."""
    rating, general, character = list(labels.rating), list(labels.general), list(labels.character)
    if character_tag_expand:
        character = [expand_character_tag(t, separator) for t in character]
    if underscore_to_space:
        rating, general, character = ([remove_underscore(t) for t in lst] for lst in (rating, general, character))
    if tag_replacement is not None:
        for src, dst in parse_tag_replacement(tag_replacement):
            logger.info(f"replacing tag: {src} -> {dst}")
            # only the first matching list, and only its first occurrence (sd-scripts order)
            for lst in (general, character, rating):
                if src in lst:
                    lst[lst.index(src)] = dst
                    break
    return Labels(rating, general, character)


def split_undesired(text: str, separator: str) -> frozenset[str]:
    """`--undesired_tags`: split on the stripped separator; entries stripped, empty ones dropped."""
    pieces = text.split(separator.strip()) if separator.strip() else [text]
    return frozenset(t.strip() for t in pieces if t.strip())


def split_always_first(text: str | None, separator: str) -> list[str] | None:
    """`--always_first_tags`: split on the stripped separator, entries **not** stripped (sd-scripts quirk).

    `"1girl, 1boy"` yields `" 1boy"`, which never matches a tag; we keep that for parity but warn.
    """
    if text is None:
        return None
    pieces = text.split(separator.strip()) if separator.strip() else [text]
    tags = [t for t in pieces if t.strip()]
    for t in tags:
        if t != t.strip():
            logger.warning(f"--always_first_tags entry {t!r} has leading/trailing spaces and will never match a "
                           f"tag (kept as sd-scripts does); write the list without spaces, e.g. '1girl,1boy'")
    return tags


def assemble_tags(probs: Sequence[float], labels: Labels, opts: TagOptions,
                  tag_freq: dict[str, int] | None = None) -> TagResult:
    """One image's tag list from its probability vector, in the spec §2 order (steps 1-3).

    ``tag_freq`` (if given) counts every emitted tag, for `--frequency_tags`.
    """
    n_rating, n_general = len(labels.rating), len(labels.general)
    result = TagResult(tags=[])
    tags = result.tags

    def emit(tag: str) -> bool:
        if tag in opts.undesired_tags:
            return False
        if tag_freq is not None:
            tag_freq[tag] = tag_freq.get(tag, 0) + 1
        return True

    # 1. general and character tags above their thresholds, CSV order
    for i, p in enumerate(probs[n_rating:]):
        if i < n_general:
            if p >= opts.general_threshold and emit(labels.general[i]):
                tags.append(labels.general[i])
                result.general.append(labels.general[i])
        elif p >= opts.character_threshold:
            tag = labels.character[i - n_general]
            if emit(tag):
                result.character.append(tag)
                if opts.character_tags_first:
                    tags.insert(0, tag)  # each inserted at 0: they end up in reverse CSV order
                else:
                    tags.append(tag)

    # 2. the most likely rating, only when asked for; the front insertion wins when both flags are set
    if opts.use_rating_tags or opts.use_rating_tags_as_last_tag:
        rating_probs = list(probs[:n_rating])
        rating = labels.rating[rating_probs.index(max(rating_probs))]  # first maximum, like argmax
        if emit(rating):
            result.rating = rating
            if opts.use_rating_tags:
                tags.insert(0, rating)
            else:
                tags.append(rating)

    # 3. always-first tags: each present one moves to the front, so the last listed ends up first
    for tag in opts.always_first_tags or []:
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return result


def merge_with_existing(existing_text: str, new_tags: Sequence[str], separator: str) -> str:
    """`--append_tags`: existing tags first (split on the stripped separator, stripped), then new ones not present."""
    stripped_sep = separator.strip()
    content = existing_text.strip("\n")
    pieces = content.split(stripped_sep) if stripped_sep else [content]
    existing = [t.strip() for t in pieces if t.strip()]
    return separator.join(existing + [t for t in new_tags if t not in existing])
