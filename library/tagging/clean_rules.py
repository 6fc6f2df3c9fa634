"""Tag and caption clean-up rules of `clean_captions_and_tags.py` (spec utilities §5).

The patterns and the replacement list are sd-scripts v0.8.7's data, kept verbatim for parity
(English- and anime-specific: every `person` becomes `girl`, spec pitfall 10).
"""
from __future__ import annotations

import logging
import re

from tqdm import tqdm

logger = logging.getLogger(__name__)

# Tags are matched as `, tag, ` inside a string where every tag has its own `, ` on both sides.
_HAIR_LENGTH = re.compile(r", (long|short|medium) hair, ")
_HAIR_CUT = re.compile(r", (bob|hime) cut, ")
_HAIR_COLOUR = re.compile(r", ([\w\-]+) hair, ")
_SINGLE_WORD = re.compile(r", ([\w\-]+|hair ornament), ")

# With several people in the picture, a description that occurs more than once cannot be attributed
# to anyone, so all occurrences go.
_REMOVE_IF_REPEATED_IN_MULTI = [
    _HAIR_LENGTH,
    _HAIR_CUT,
    re.compile(r", [\w\-]+ eyes, "),
    re.compile(r", ([\w\-]+ sleeves|sleeveless), "),
    re.compile(r", (ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up"
               r"|two tails|[\w\-]+ braid|sidelocks), "),
]

_PROTECT = "^@@@^"  # stand-in for `^_^` while underscores become spaces
_HAIR_LENGTH_MARK = ", @@@, "

# Applied in order; each pair repeated until the text stops changing; the list is not restarted.
CAPTION_REPLACEMENTS: list[tuple[str, str]] = [
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
]


def _remove_multi_person_repeats(tags: str) -> str:
    """Drop descriptions that occur more than once; `X hair` colours too, keeping the hair length."""
    for pattern in _REMOVE_IF_REPEATED_IN_MULTI:
        if len(pattern.findall(tags)) > 1:
            tags = pattern.sub("", tags)
    # a single remaining hair length (everyone's hair) must survive the `X hair` colour rule below
    length = _HAIR_LENGTH.search(tags)
    if length:
        tags = _HAIR_LENGTH.sub(_HAIR_LENGTH_MARK, tags)
    if len(_HAIR_COLOUR.findall(tags)) > 1:
        tags = _HAIR_COLOUR.sub("", tags)
    if length:
        tags = tags.replace(_HAIR_LENGTH_MARK, length.group())
    return tags


def clean_tags(image_key: str, tags: str) -> str:
    """Clean one tag string (spec §5): underscores, rating tail, multi-person repeats, redundant single words."""
    tags = tags.replace("^_^", _PROTECT).replace("_", " ").replace(_PROTECT, "^_^")

    # DeepDanbooru tag strings end with `, rating:…`; WD14 ones have none
    pieces = tags.split(", rating")
    if len(pieces) > 2:
        logger.warning(f"multiple ratings: {image_key} {tags}")
    tags = pieces[0]

    # every tag gets its own `, ` on both sides so patterns can match whole tags
    tags = ", " + tags.replace(", ", ", , ") + ", "
    if "girls" in tags or "boys" in tags:
        tags = _remove_multi_person_repeats(tags)

    # `shirt` is redundant next to `white shirt`
    for word in _SINGLE_WORD.findall(tags):
        if re.search(rf", ((\w+) )+{re.escape(word)}, ", tags):
            tags = tags.replace(f", {word}, ", "")

    tags = tags.replace(", , ", ", ")
    return tags[2:-2]


def clean_caption(caption: str) -> str:
    """Apply CAPTION_REPLACEMENTS in order, each until the caption stops changing (spec §5)."""
    for old, new in CAPTION_REPLACEMENTS:
        while True:
            replaced = caption.replace(old, new)
            if replaced == caption:
                break
            caption = replaced
    return caption


def clean_metadata(metadata: dict, debug: bool = False) -> dict:
    """Clean `tags` and `caption` of every entry in place; missing fields are logged as errors."""
    for key, entry in tqdm(metadata.items()):
        for field, cleaner in (("tags", lambda t: clean_tags(key, t)), ("caption", clean_caption)):
            value = entry.get(field)
            if value is None:
                logger.error(f"image does not have {field}: {key}")
                continue
            cleaned = cleaner(value)
            entry[field] = cleaned
            if debug and cleaned != value:
                logger.info(f"FROM: {value}\nTO:   {cleaned}")
    return metadata
