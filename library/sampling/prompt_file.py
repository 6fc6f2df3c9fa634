"""Prompt files: training `--sample_prompts` (.txt/.toml/.json) and gen_img prompt-line options.

spec generation.md §3 (prompt-line syntax) and §4 (sample prompts during training).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import toml

from library.errors import UserError

logger = logging.getLogger(__name__)

OPTION_SEPARATOR = " --"

# ---------------------------------------------------------------- training sample prompts (§4)

SAMPLE_PROMPT_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": None,
    "width": 512,  # also for SDXL (spec pitfall 3)
    "height": 512,
    "sample_steps": 30,
    "scale": 7.5,
    "seed": None,  # None: a nondeterministic seed per image
    "controlnet_image": None,
}

# option key -> (value regex, dict key, converter); spec §4 ("--d" takes one integer here)
_SAMPLE_OPTIONS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "w": (r"(\d+)", "width", int),
    "h": (r"(\d+)", "height", int),
    "d": (r"(\d+)", "seed", int),
    "s": (r"(\d+)", "sample_steps", int),
    "l": (r"([\d\.]+)", "scale", float),
    "n": (r"(.+)", "negative_prompt", str),
    "ss": (r"(.+)", "sample_sampler", str),
    "cn": (r"(.+)", "controlnet_image", str),
}


def line_to_prompt_dict(line: str) -> dict[str, Any]:
    """One sample-prompt line -> dict of the keys it gives. spec §4.

    Fix of spec pitfall 1: upstream also matched the option patterns against the prompt piece itself, so a
    prompt starting with e.g. "n " or "w 512" lost its text to an option; here only the pieces after
    the first " --" are options.
    """
    pieces = line.split(OPTION_SEPARATOR)
    result: dict[str, Any] = {"prompt": pieces[0]}
    result.update(_parse_options(pieces[1:], _SAMPLE_OPTIONS, line))
    return result


def _parse_options(pieces: list[str], table: dict[str, tuple[str, str, Callable[[str], Any]]],
                   line: str) -> dict[str, Any]:
    """Match each `key value` piece against `table`; unknown or unparsable pieces are logged and skipped."""
    values: dict[str, Any] = {}
    for piece in pieces:
        key, _, rest = piece.partition(" ")
        entry = table.get(key.lower())
        if entry is None:
            logger.warning("unknown prompt option --%s in: %s", piece, line)
            continue
        pattern, name, convert = entry
        try:
            match = re.match(pattern, rest, re.IGNORECASE)
            if match is None:
                raise ValueError(f"value does not match {pattern}")
            values[name] = convert(match.group(1))
        except ValueError as e:
            logger.error("cannot parse prompt option --%s (%s); ignored", piece, e)
    return values


def load_sample_prompts(path: str, default_sampler: str = "ddim") -> list[dict[str, Any]]:
    """Read a `--sample_prompts` file into complete prompt dicts with `enum`. spec §4."""
    if not os.path.isfile(path):
        raise UserError(f"--sample_prompts {path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    readers = {".txt": _read_txt, ".toml": _read_toml, ".json": _read_json}
    if ext not in readers:
        raise UserError(f"--sample_prompts {path}: unsupported file type {ext!r}; use .txt, .toml or .json")
    items = readers[ext](path)
    prompts = []
    for i, item in enumerate(items):
        raw = line_to_prompt_dict(item) if isinstance(item, str) else item
        prompts.append(normalize_sample_prompt(raw, i, default_sampler, path))
    return prompts


def _read_txt(path: str) -> list[str]:
    """Stripped non-empty lines whose raw first character is not `#`."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and line[0] != "#"]


def _read_toml(path: str) -> list[dict[str, Any]]:
    """`[prompt]` shared keys merged into each `[[prompt.subset]]`."""
    try:
        data = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--sample_prompts {path}: not valid TOML: {e}") from e
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise UserError(f"--sample_prompts {path}: needs a [prompt] table with [[prompt.subset]] entries")
    shared = {k: v for k, v in table.items() if k != "subset"}
    merged = []
    for i, subset in enumerate(subsets):
        both = sorted(set(shared) & set(subset))
        if both:
            # upstream: dict(**shared, **subset) -> TypeError "got multiple values for keyword argument"
            raise UserError(f"--sample_prompts {path}: key(s) {', '.join(both)} given both in [prompt] "
                            f"and in [[prompt.subset]] #{i + 1}; give each key at one level only")
        merged.append({**shared, **subset})
    return merged


def _read_json(path: str) -> list[dict[str, Any] | str]:
    """A JSON list of prompt dicts or prompt lines."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--sample_prompts {path}: not valid JSON: {e}") from e
    if not isinstance(data, list) or not all(isinstance(x, (dict, str)) for x in data):
        raise UserError(f"--sample_prompts {path}: must be a JSON list of objects or strings")
    return data


def normalize_sample_prompt(raw: dict[str, Any], enum: int, default_sampler: str,
                            source: str = "prompt") -> dict[str, Any]:
    """Fill defaults, round sizes down to multiples of 8 (min 64), clamp steps to 1..1000. spec §4."""
    d = {**SAMPLE_PROMPT_DEFAULTS, "sample_sampler": default_sampler, **raw}
    d.pop("subset", None)
    try:
        for key in ("width", "height"):
            d[key] = max(64, int(d[key]) - int(d[key]) % 8)
        # upstream clamps steps only for .txt lines; clamping every source avoids a scheduler error later
        d["sample_steps"] = max(1, min(1000, int(d["sample_steps"])))
        d["scale"] = float(d["scale"])
        d["seed"] = None if d["seed"] is None else int(d["seed"])
    except (TypeError, ValueError) as e:
        raise UserError(f"--sample_prompts {source}: prompt #{enum + 1} has a bad value: {e}") from e
    d["enum"] = enum
    return d


# ---------------------------------------------------------------- gen_img prompt lines (§3)

@dataclass
class PromptOptions:
    """Inline options of one gen_img prompt line; None = not given (use the command-line value)."""

    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    steps: int | None = None
    seeds: list[int] | None = None
    strength: float | None = None
    scale: float | None = None
    guidance_scale: float | None = None  # FLUX.1 dev only
    negative_scale: float | None = None
    negative_scale_disabled: bool = False  # `--nl none`: no negative scale even if given on the command line
    negative_prompt: str | None = None
    clip_prompt: str | None = None
    network_muls: list[float] | None = None
    ds_depth_1: int | None = None
    ds_timesteps_1: int | None = None
    ds_depth_2: int | None = None
    ds_timesteps_2: int | None = None
    ds_ratio: float | None = None
    gradual_latent_timesteps: int | None = None
    gradual_latent_ratio: float | None = None
    gradual_latent_every_n_steps: int | None = None
    gradual_latent_ratio_step: float | None = None
    gradual_latent_s_noise: float | None = None
    gradual_latent_unsharp_params: list[float] | None = None

    def overrides(self) -> dict[str, Any]:
        """The options this line gave, by field name (`negative_scale: None` for `--nl none`)."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "negative_scale_disabled" and getattr(self, f.name) is not None}
        if self.negative_scale_disabled:
            given["negative_scale"] = None
        return given

    @property
    def deep_shrink_given(self) -> bool:
        """Any `--dsd1/--dst1/--dsd2/--dst2/--dsr` enables Deep Shrink for this line."""
        return any(k.startswith("ds_") for k in self.overrides())

    @property
    def gradual_latent_given(self) -> bool:
        """Any `--glt/--glr/--gle/--gls/--glsn/--glus` enables Gradual Latent for this line."""
        return any(k.startswith("gradual_latent_") for k in self.overrides())


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _steps(text: str) -> int:
    return max(1, min(1000, int(text)))


def _negative_scale(text: str) -> float | str:
    return "none" if text.lower() == "none" else float(text)


_INT, _FLOAT, _TEXT = r"(\d+)", r"([\d\.]+)", r"(.+)"
_INT_AS_FLOAT = _FLOAT  # upstream matches a float literal for these, then int() refuses "1.5" (logged)
_LIST = r"([\d\.\-,]+)"

# option key -> (value regex, PromptOptions field, converter); spec §3
_LINE_OPTIONS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "w": (_INT, "width", int),
    "h": (_INT, "height", int),
    "ow": (_INT, "original_width", int),
    "oh": (_INT, "original_height", int),
    "nw": (_INT, "original_width_negative", int),
    "nh": (_INT, "original_height_negative", int),
    "ct": (_INT, "crop_top", int),
    "cl": (_INT, "crop_left", int),
    "s": (_INT, "steps", _steps),
    "d": (r"([\d,]+)", "seeds", _ints),
    "t": (_FLOAT, "strength", float),
    "l": (_FLOAT, "scale", float),
    "g": (_FLOAT, "guidance_scale", float),  # as sd-scripts' FLUX sample prompts
    "nl": (r"([\d\.]+|none)", "negative_scale", _negative_scale),
    "n": (_TEXT, "negative_prompt", str),
    "c": (_TEXT, "clip_prompt", str),
    "am": (_LIST, "network_muls", _floats),
    "dsd1": (_INT_AS_FLOAT, "ds_depth_1", int),
    "dst1": (_INT_AS_FLOAT, "ds_timesteps_1", int),
    "dsd2": (_INT_AS_FLOAT, "ds_depth_2", int),
    "dst2": (_INT_AS_FLOAT, "ds_timesteps_2", int),
    "dsr": (_FLOAT, "ds_ratio", float),
    "glt": (_INT_AS_FLOAT, "gradual_latent_timesteps", int),
    "glr": (_FLOAT, "gradual_latent_ratio", float),
    "gle": (_INT_AS_FLOAT, "gradual_latent_every_n_steps", int),
    "gls": (_FLOAT, "gradual_latent_ratio_step", float),
    "glsn": (_FLOAT, "gradual_latent_s_noise", float),
    "glus": (_LIST, "gradual_latent_unsharp_params", _floats),
}


def line_option_key(field: str) -> str:
    """The prompt-line option (``w``, ``glr``, ...) that sets ``PromptOptions.<field>``."""
    return next(key for key, (_, name, _) in _LINE_OPTIONS.items() if name == field)


def parse_prompt_line(line: str) -> tuple[str, PromptOptions]:
    """Split a gen_img prompt line on " --" into the prompt and its inline options. spec §3.

    Keys are case-insensitive; values extend to the next " --"; unknown or unparsable options are
    logged and ignored; a later occurrence of an option wins.
    """
    pieces = line.strip().split(OPTION_SEPARATOR)
    options = PromptOptions()
    for name, value in _parse_options(pieces[1:], _LINE_OPTIONS, line).items():
        setattr(options, name, value)
    if options.negative_scale == "none":
        options.negative_scale, options.negative_scale_disabled = None, True
    return pieces[0], options


def pad_with_last(values: list[float], n: int) -> list[float]:
    """Pad a per-network list (`--am`) to n entries with its last value. spec §3."""
    return values + values[-1:] * max(0, n - len(values))
