"""The one rule for what a ``--config_file`` may hold: which keys count, and what their values mean.

sd-scripts reads a config file by setting attributes after argparse, so it takes any key and any value.
Front-ends (kohya_ss, lora-scripts, kohya-colab, LoRA_Easy_Training_Scripts) rely on that: they write
their own bookkeeping keys and values argparse would refuse. We keep checking (a typo such as
``learning_rat`` must not cost hours of training) but accept what upstream accepts, with upstream's
meaning. Keys that are not options of the running script:

1. a key of another sd-scripts script (``learning_rate_te1`` in a train_network config) is a warning
   naming that script, and is ignored;
2. a key within a small edit distance of one of this script's options is a typo: an error with
   "did you mean";
3. any other key (a front-end's own bookkeeping: ``epoch``, ``noise_offset_type``, ``lr_restart_cycles``)
   is ignored, with one warning line listing all such keys.

Values, beyond what the command line accepts (see ``config_file._check_value``):

* a flag takes ``true``/``false`` and also ``1``/``0`` (upstream tests truthiness; the GUI writes ints);
* ``""`` for an option whose default is None means "not given" (upstream: ``if args.reg_data_dir:``);
* a whole float (``8.0``) for an integer option is that integer;
* the few values in ``CONFIG_ONLY_VALUES`` below, which upstream's config path accepts with a
  defined meaning although its command line refuses them.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# option -> {value written in a config file: the value it means here}. Only values whose upstream meaning
# is exactly that of another accepted value belong here.
CONFIG_ONLY_VALUES: dict[str, dict[Any, Any]] = {
    # upstream computes 75 + 2 = 77 tokens and one chunk: the plain 75-token length (kohya_ss's default)
    "max_token_length": {75: None},
    # accelerate's "no" backend compiles nothing; upstream passes it through unchanged
    "dynamo_backend": {"no": "no"},
}

# option names of every sd-scripts v0.8.7 script with a parser, and which of them read --config_file
_UPSTREAM_OPTIONS_FILE = Path(__file__).with_name("sd_scripts_options.json")


@dataclass
class KeyVerdicts:
    """How the keys of one config file that are not options of the running script are treated."""

    typos: list[tuple[str, str]] = field(default_factory=list)  # (key, the option it is close to)
    other_script: list[tuple[str, list[str]]] = field(default_factory=list)  # (key, scripts that have it)
    unknown: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def upstream_options() -> dict[str, frozenset[str]]:
    """Option names of the sd-scripts v0.8.7 scripts that read a ``--config_file`` (the trainers and the
    caching tools), from a data file generated from upstream's parsers. Other scripts (converters,
    generators) do not count: their ``--epoch`` says nothing about a training config's ``epoch``."""
    with open(_UPSTREAM_OPTIONS_FILE, encoding="utf-8") as f:
        data = json.load(f)
    return {script: frozenset(data["scripts"][script]) for script in data["config_file_scripts"]}


def scripts_with_option(key: str, exclude: str) -> list[str]:
    return sorted(s for s, dests in upstream_options().items() if key in dests and s != exclude)


def classify_keys(keys: Iterable[str], script: str, own: Iterable[str]) -> KeyVerdicts:
    """Sort the keys that are not options of ``script`` (``own`` = its option names) by the rule above."""
    own = list(own)
    own_set = set(own)
    verdicts = KeyVerdicts()
    for key in keys:
        if key in own_set:
            continue
        others = scripts_with_option(key, script)
        if others:
            verdicts.other_script.append((key, others))
            continue
        close = closest_option(key, own)
        if close is not None:
            verdicts.typos.append((key, close))
        else:
            verdicts.unknown.append(key)
    return verdicts


def closest_option(key: str, options: Iterable[str]) -> str | None:
    """The option ``key`` is a likely misspelling of, or None. Case is ignored; the allowed distance grows
    with the length (1 edit up to 5 letters, 2 up to 12, 3 beyond), so short bookkeeping words stay apart."""
    k = key.lower()
    limit = 1 if len(k) <= 5 else 2 if len(k) <= 12 else 3
    best: tuple[int, str] | None = None
    for option in options:
        if abs(len(option) - len(k)) > limit:
            continue
        d = edit_distance(k, option.lower(), limit)
        if d <= limit and (best is None or d < best[0]):
            best = (d, option)
    return best[1] if best else None


def edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (insert, delete, substitute, swap two neighbours); stops early
    once every path is over ``limit`` and returns ``limit + 1``."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = ca != cb
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]
