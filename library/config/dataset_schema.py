"""The ``--dataset_config`` schema: key groups, placement, style detection (spec dataset-config §2).

Validation uses voluptuous with extra keys forbidden at every level, like sd-scripts'
``ConfigSanitizer``. Differences, all about errors being clear rather than accepting more:
* a schema error is one ``UserError`` naming the file, the place (``datasets[0].subsets[1]``), the
  key and what was expected; an unknown key also gets the closest valid name, and a key that is
  valid elsewhere (a DATASET key in a subset, a dropout key for textual inversion,
  ``conditioning_data_dir`` without ``--masked_loss``) says why it is not allowed here;
* ``caption_separator`` is rejected with a message saying it is a command-line option in v0.8.x;
* a dataset whose style the trainer does not support is named as such (upstream reports schema
  errors of the one style it tried);
* ints are not accepted for bool keys nor bools for int keys; ints are accepted for float keys
  (``network_multiplier = 1``), which upstream rejects;
* ``resolution`` may also be written as ``"W,H"`` or ``"S"``.
[v0.9.0+] ``alpha_mask`` is accepted in DreamBooth and fine-tuning subsets; ``validation_split`` and
``validation_seed`` (later sd-scripts) at every level.
"""
from __future__ import annotations

import difflib
import json
import os
from typing import Any, Callable

import toml
import voluptuous as vol

from library.config.options import range_of
from library.errors import UserError

STYLES = ("dreambooth", "finetuning", "controlnet")


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise vol.Invalid("expected true or false")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise vol.Invalid("expected an integer")
    return v


def _number(v: Any) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise vol.Invalid("expected a number")
    return v


def _float(v: Any) -> float:
    return float(_number(v))


def _fraction(v: Any) -> float:
    value = _float(v)
    if not 0.0 <= value <= 1.0:
        raise vol.Invalid("expected a number from 0.0 to 1.0")
    return value


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise vol.Invalid("expected a string")
    return v


def _float_pair(v: Any) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise vol.Invalid("expected an array of two numbers [lo, hi]")
    return (_float(v[0]), _float(v[1]))


def parse_resolution(v: Any) -> tuple[int, int]:
    """int → (v, v); ``[w, h]`` → (w, h); ``"S"`` / ``"W,H"`` → tuple (spec dataset-config §2.1)."""
    if isinstance(v, str):
        try:
            parts = [int(p) for p in v.split(",")]
        except ValueError:
            raise vol.Invalid('expected an integer, "W,H" or [W, H]') from None
        v = parts[0] if len(parts) == 1 else parts
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        if min(v) < 1:
            raise vol.Invalid("out of range: width and height must be >= 1")
        return (v[0], v[1])
    raise vol.Invalid('expected an integer, "W,H" or [W, H]')


def _in_range_of(option: str, check: Callable) -> Callable:
    """``check`` the type, then the range declared for ``--option`` (library/config/ranges.py): a dataset
    key and the command-line option it mirrors share one range."""
    def validate(v: Any) -> Any:
        value = check(v)
        allowed = range_of(option)
        if allowed is not None and value not in allowed:
            raise vol.Invalid(f"out of range: it must be {allowed.describe()} (as --{option})")
        return value

    return validate


# key groups of spec dataset-config §2.1
SUBSET_COMMON: dict[str, Callable] = {
    "color_aug": _bool, "face_crop_aug_range": _float_pair, "flip_aug": _bool,
    "num_repeats": _int,  # < 1 is allowed: such a subset is ignored with a warning, as upstream
    "random_crop": _bool, "shuffle_caption": _bool, "keep_tokens": _in_range_of("keep_tokens", _int),
    "keep_tokens_separator": _str, "secondary_separator": _str, "enable_wildcard": _bool,
    "token_warmup_min": _in_range_of("token_warmup_min", _int),
    "token_warmup_step": _in_range_of("token_warmup_step", _number),
    "caption_prefix": _str, "caption_suffix": _str,
    # later sd-scripts' validation keys (docs/beyond-sd-scripts.md): valid in a subset, dataset or [general]
    "validation_split": _fraction, "validation_seed": _in_range_of("validation_seed", _int),
}
DROPOUT = {"caption_dropout_every_n_epochs": _in_range_of("caption_dropout_every_n_epochs", _int),
           "caption_dropout_rate": _in_range_of("caption_dropout_rate", _number),
           "caption_tag_dropout_rate": _in_range_of("caption_tag_dropout_rate", _number)}
DB_ASCENDABLE = {"caption_extension": _str, "class_tokens": _str, "cache_info": _bool}
DB_DISTINCT = {vol.Required("image_dir"): _str, "is_reg": _bool, "alpha_mask": _bool}
FT_DISTINCT = {vol.Required("metadata_file"): _str, "image_dir": _str, "alpha_mask": _bool}
CN_ASCENDABLE = {"caption_extension": _str, "cache_info": _bool}
CN_DISTINCT = {vol.Required("image_dir"): _str, vol.Required("conditioning_data_dir"): _str}
DATASET = {
    "batch_size": _in_range_of("train_batch_size", _int), "bucket_no_upscale": _bool,
    "bucket_reso_steps": _in_range_of("bucket_reso_steps", _int), "enable_bucket": _bool,
    "max_bucket_reso": _in_range_of("max_bucket_reso", _int), "min_bucket_reso": _in_range_of("min_bucket_reso", _int),
    "resolution": parse_resolution, "network_multiplier": _float,
}

_STYLE_HINT = {
    "dreambooth": "subsets with image_dir and no metadata_file",
    "finetuning": "every subset has metadata_file",
    "controlnet": "every subset has image_dir and conditioning_data_dir",
}

_WHY_NOT = {
    "caption_separator": "caption_separator is a command-line option in v0.8.x (--caption_separator), "
                         "not a dataset config key",
    "conditioning_data_dir": "ControlNet-style subsets (conditioning_data_dir) need --masked_loss and a trainer "
                             "that supports them",
}


def _merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


def _names(schema: dict) -> list[str]:
    return [str(k) for k in schema]


class ConfigSanitizer:
    """Schema of one trainer (spec dataset-config §2.2, §2.3): which styles and whether dropout keys."""

    def __init__(self, support_dreambooth: bool, support_finetuning: bool, support_controlnet: bool,
                 support_dropout: bool) -> None:
        if not (support_dreambooth or support_finetuning or support_controlnet):
            raise ValueError("a ConfigSanitizer needs at least one dataset style")
        self.support_dreambooth = support_dreambooth
        self.support_dropout = support_dropout
        # which schema a [[datasets]] entry may use; upstream's order of checks (spec §2.3): a trainer
        # with DreamBooth but not fine-tuning and with ControlNet (train_db --masked_loss) takes CN only
        if support_dreambooth and support_finetuning:
            styles = ["controlnet"] if support_controlnet else []
            self.dataset_styles = tuple(styles + ["finetuning", "dreambooth"])
        elif support_dreambooth:
            self.dataset_styles = ("controlnet",) if support_controlnet else ("dreambooth",)
        else:
            self.dataset_styles = ("finetuning",) if support_finetuning else ("controlnet",)
        dropout = DROPOUT if support_dropout else {}
        self.subset_keys = {
            "dreambooth": _merge(SUBSET_COMMON, DB_DISTINCT, DB_ASCENDABLE, dropout),
            "finetuning": _merge(SUBSET_COMMON, FT_DISTINCT, dropout),
            "controlnet": _merge(SUBSET_COMMON, CN_DISTINCT, CN_ASCENDABLE, dropout),
        }
        self.dataset_keys = {
            "dreambooth": _merge(DATASET, SUBSET_COMMON, DB_ASCENDABLE, dropout),
            "finetuning": _merge(DATASET, SUBSET_COMMON, dropout),
            "controlnet": _merge(DATASET, SUBSET_COMMON, CN_ASCENDABLE, dropout),
        }
        self.general_keys = _merge(
            DATASET, SUBSET_COMMON, DB_ASCENDABLE if support_dreambooth else {},
            CN_ASCENDABLE if support_controlnet else {}, dropout,
        )
        # every key the schema knows at some level: these get a "not allowed here" message
        self._all_keys = set(_names(_merge(DATASET, SUBSET_COMMON, DROPOUT, DB_ASCENDABLE, DB_DISTINCT,
                                           FT_DISTINCT, CN_ASCENDABLE, CN_DISTINCT)))

    def detect_style(self, dataset: dict, where: str, source: str) -> str:
        """DreamBooth / fine-tuning / ControlNet from the subsets' keys (spec dataset-config §2.3)."""
        subsets = dataset.get("subsets", [])
        if not subsets:  # an empty list passes every all(...) test: the first accepted style
            return next(s for s in ("controlnet", "finetuning", "dreambooth") if s in self.dataset_styles)
        subsets = [s if isinstance(s, dict) else {} for s in subsets]
        if "controlnet" in self.dataset_styles and all("conditioning_data_dir" in s for s in subsets):
            style = "controlnet"
        elif all("metadata_file" in s for s in subsets):
            style = "finetuning"
        elif all("metadata_file" not in s for s in subsets):
            style = "dreambooth"
        else:
            raise UserError(f"{source}: {where}: DreamBooth subset and fine tuning subset cannot be mixed in the "
                            "same dataset (some subsets have metadata_file, some not); split them into "
                            "separate datasets")
        if style not in self.dataset_styles:
            accepted = "; ".join(f"{s} ({_STYLE_HINT[s]})" for s in self.dataset_styles)
            raise UserError(f"{source}: {where} is a {style}-style dataset, which this trainer does not accept "
                            f"here; accepted: {accepted}")
        return style

    def sanitize(self, user_config: Any, source: str = "dataset config") -> dict:
        """Validate a loaded config; return it with values converted (tuples for pairs, floats...)."""
        if not isinstance(user_config, dict):
            raise UserError(f"{source}: the top level must be a table with 'general' and/or 'datasets'")
        top = {"general": dict, "datasets": list}
        self._check_unknown(user_config, list(top), "top level", source)
        out: dict = {}
        if "general" in user_config:
            out["general"] = self._validate(self.general_keys, user_config["general"], "general", source)
        datasets = user_config.get("datasets", [])
        if not isinstance(datasets, list):
            raise UserError(f"{source}: 'datasets' must be an array of tables ([[datasets]])")
        out["datasets"] = []
        for i, dataset in enumerate(datasets):
            where = f"datasets[{i}]"
            if not isinstance(dataset, dict):
                raise UserError(f"{source}: {where} must be a table")
            style = self.detect_style(dataset, where, source)
            subsets = dataset.get("subsets", [])
            if not isinstance(subsets, list):
                raise UserError(f"{source}: {where}.subsets must be an array of tables ([[datasets.subsets]])")
            body = {k: v for k, v in dataset.items() if k != "subsets"}
            converted = self._validate(self.dataset_keys[style], body, where, source, extra_ok=("subsets",))
            converted["subsets"] = [
                self._validate(self.subset_keys[style], s, f"{where}.subsets[{j}]", source) for j, s in enumerate(subsets)
            ]
            converted["_style"] = style
            out["datasets"].append(converted)
        return out

    def _validate(self, keys: dict, data: Any, where: str, source: str, extra_ok: tuple = ()) -> dict:
        if not isinstance(data, dict):
            raise UserError(f"{source}: {where} must be a table")
        self._check_unknown(data, _names(keys) + list(extra_ok), where, source)
        try:
            return vol.Schema(keys)({k: v for k, v in data.items() if k not in extra_ok})
        except vol.MultipleInvalid as e:
            err = e.errors[0]
            key = ".".join(str(p) for p in err.path)
            if isinstance(err, vol.RequiredFieldInvalid):
                raise UserError(f"{source}: {where}: required key '{key}' is missing") from None
            value = data.get(err.path[0]) if err.path else None
            raise UserError(f"{source}: {where}.{key} = {value!r}: {err.msg}") from None

    def _check_unknown(self, data: dict, allowed: list[str], where: str, source: str) -> None:
        for key in data:
            if key not in allowed:
                raise UserError(f"{source}: {where}: {self._why_not(str(key), allowed, where)}")

    def _why_not(self, key: str, allowed: list[str], where: str) -> str:
        """Say why a key is rejected: known elsewhere (and where), or unknown (closest valid name)."""
        in_subset = ".subsets[" in where
        if key == "conditioning_data_dir" and "controlnet" in self.dataset_styles:
            return "key 'conditioning_data_dir' not allowed here: a ControlNet-style dataset needs it in every subset"
        if key in _WHY_NOT:
            return f"key '{key}' not allowed: {_WHY_NOT[key]}"
        if key in DROPOUT and not self.support_dropout:
            return f"key '{key}' not allowed: this trainer does not support caption dropout"
        if key in DATASET and in_subset:
            return f"key '{key}' not allowed in a subset: it is a dataset key ([[datasets]] or [general])"
        if key in _names(_merge(DB_DISTINCT, FT_DISTINCT, CN_DISTINCT)) and not in_subset:
            return f"key '{key}' not allowed here: it belongs in a subset ([[datasets.subsets]])"
        if key in self._all_keys:
            return f"key '{key}' not allowed here for this dataset style / trainer"
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed here: {', '.join(sorted(allowed))}"
        return f"unknown key '{key}'; {hint}"


# spec dataset-config §2.3 table: (dreambooth, finetuning, controlnet (= --masked_loss), dropout)
_TRAINER_FLAGS = {
    "train_network": (True, True, None, True),
    "sdxl_train_network": (True, True, None, True),
    "flux_train_network": (True, True, None, True),
    "sdxl_train": (True, True, None, True),
    "train_db": (True, False, None, True),
    "fine_tune": (False, True, False, True),
    "train_textual_inversion": (True, True, None, False),
    "sdxl_train_textual_inversion": (True, True, None, False),
    "cache_latents": (True, True, False, True),
    "cache_text_encoder_outputs": (True, True, False, True),
    "train_controlnet": (False, False, True, True),
    "sdxl_train_control_net_lllite": (False, False, True, True),
}


def sanitizer_for(script: str, masked_loss: bool = False) -> ConfigSanitizer:
    """The ConfigSanitizer a trainer uses; ``None`` in the table means "= --masked_loss"."""
    db, ft, cn, dropout = _TRAINER_FLAGS[script]
    cn = masked_loss if cn is None else cn
    return ConfigSanitizer(db, ft, cn, dropout)


def load_dataset_config(path: str | os.PathLike) -> dict:
    """Read a ``.toml`` or ``.json`` dataset config (by extension, case-insensitive; UTF-8)."""
    path = str(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".json"):
        raise UserError(f"--dataset_config {path}: expected a .toml or .json file")
    if not os.path.isfile(path):
        raise UserError(f"--dataset_config {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return toml.load(f) if ext == ".toml" else json.load(f)
    except (toml.TomlDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--dataset_config {path}: not a valid UTF-8 {ext[1:].upper()} file: {e}") from None
