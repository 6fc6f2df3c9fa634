"""Dynamic prompts: `{a|b}`, `{N$$a|b}`, `{N-M$$sep$$a|b}`, `{e$$a|b}` in gen_img prompt lines.

spec generation.md §3. Upstream draws from Python's module-level `random` (never seeded in gen_img, so
`--seed` does not reproduce the picks); here the caller passes a `random.Random` (seeded from `--seed`), so
runs are reproducible. Its `randint`/`sample` calls are the upstream ones, in the same order.
"""
from __future__ import annotations

import itertools
import logging
import random
import re
from typing import Callable

logger = logging.getLogger(__name__)

# groups: 2 = "e"/"E" (enumerate), 4 = count or range, 6 = joiner, 7 = the alternatives
RE_DYNAMIC_PROMPT = re.compile(r"\{((e|E)\$\$)?(([\d\-]+)\$\$)?(([^\|\}]+?)\$\$)?(.+?((\|).+?)*?)\}")

Replacer = Callable[[], list[str]]


def parse_count_range(text: str | None, n_variants: int) -> tuple[int, int]:
    """`N` or `N-M` -> (low, high) clamped to 0..n_variants; invalid -> (1, 1) with a warning."""
    if text is None:
        return 1, 1
    try:
        bounds = [int(v) for v in text.split("-")]
    except ValueError:
        bounds = []  # e.g. "1-" or "-": upstream crashes on int("")
    if len(bounds) not in (1, 2):
        logger.warning("invalid count range in dynamic prompt: %s", text)
        return 1, 1
    low, high = min(bounds), max(bounds)
    high = min(high, n_variants)
    # upstream clamps only the upper bound, so {5$$a|b} crashes (randint(5, 2)) or enumerates nothing
    return max(0, min(low, high)), high


def _enumerate_all(variants: list[str], low: int, high: int, sep: str) -> Replacer:
    def replacer() -> list[str]:
        return [sep.join(c) for n in range(low, high + 1) for c in itertools.combinations(variants, n)]
    return replacer


def _pick_random(variants: list[str], low: int, high: int, sep: str, rng: random.Random) -> Replacer:
    def replacer() -> list[str]:
        count = rng.randint(low, high)
        return [sep.join(rng.sample(variants, count))]
    return replacer


def expand_dynamic_prompts(prompt: str, repeat_count: int, rng: random.Random) -> list[str]:
    """Expand the `{...}` parts of one prompt line into the prompts to generate. spec §3.

    No dynamic part: `[prompt]`. Random parts only: `repeat_count` prompts (one per image), each part picked
    independently. Any `{e$$...}`: every combination of the enumerated parts becomes its own prompt
    (`repeat_count` is ignored), random parts picked once per resulting prompt.
    """
    founds = list(RE_DYNAMIC_PROMPT.finditer(prompt))
    if not founds:
        return [prompt]
    replacers: list[Replacer] = []
    for found in founds:
        variants = found.group(7).split("|")
        sep = ", " if found.group(6) is None else found.group(6)
        low, high = parse_count_range(found.group(4), len(variants))
        if found.group(2) is not None:
            replacers.append(_enumerate_all(variants, low, high, sep))
        else:
            replacers.append(_pick_random(variants, low, high, sep, rng))
    enumerating = [f.group(2) is not None for f in founds]

    if not any(enumerating):
        prompts = []
        for _ in range(repeat_count):
            current = prompt
            for found, replacer in zip(founds, replacers):
                current = current.replace(found.group(0), replacer()[0], 1)
            prompts.append(current)
        return prompts

    prompts = [prompt]
    for found, replacer, enum in zip(founds, replacers, enumerating):
        if enum:
            prompts = [p.replace(found.group(0), value, 1) for p in prompts for value in replacer()]
    for found, replacer, enum in zip(founds, replacers, enumerating):
        if not enum:
            prompts = [p.replace(found.group(0), replacer()[0], 1) for p in prompts]
    return prompts
