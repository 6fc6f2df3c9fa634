"""From ``--dataset_config`` or the command line to resolved per-dataset parameters (spec dataset-config §1-§4).

``dataset_params_from_args(args, script)`` is the one entry: it takes the dataset definition from
``--dataset_config`` or generates it from the command line (DreamBooth folder mode §4, fine-tuning
mode §1), validates it (``dataset_schema``), and resolves every parameter by the fallback chain
subset → dataset → general → command line → runtime → built-in default (§3) into plain
``DatasetParams`` / ``SubsetParams``. Nothing here reads images; ``library/data`` builds datasets.

Deviations from sd-scripts, each for clearer or reproducible behaviour:
* folder mode lists sub-folders sorted by name (upstream: ``Path.iterdir()`` order, which depends on
  the file system), so subset order and thus data order are the same on every machine;
* a DreamBooth/ControlNet subset whose ``image_dir`` is not a folder, a missing ``metadata_file``,
  a missing ``--train_data_dir`` folder and a DreamBooth dataset without a resolution are
  ``UserError`` naming the subset (upstream crashes or asserts later);
* fine-tuning mode without ``--train_data_dir`` leaves ``image_dir`` unset (keys must then be paths)
  instead of failing schema validation on ``image_dir = None``;
* ``caption_extension`` gets its leading dot here, for config values as well as the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import voluptuous as vol

from library.config.dataset_schema import ConfigSanitizer, load_dataset_config, parse_resolution, sanitizer_for
from library.errors import UserError

logger = logging.getLogger(__name__)

# command-line name → config name (spec dataset-config §3)
ARGPARSE_TO_CONFIG = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


@dataclass
class SubsetParams:
    """One subset with every parameter resolved (spec dataset-config §2.1, §3 defaults)."""

    image_dir: str | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    # validation (later sd-scripts' keys): the share of this subset's images held out, and the split's seed
    validation_split: float = 0.0
    validation_seed: int | None = None
    # style-specific: DreamBooth
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    # fine-tuning
    metadata_file: str | None = None
    # ControlNet (also the v0.8.x mask source)
    conditioning_data_dir: str | None = None
    alpha_mask: bool = False  # [v0.9.0+]


@dataclass
class DatasetParams:
    """One dataset with its parameters and subsets resolved (spec dataset-config §3)."""

    style: str = "dreambooth"  # 'dreambooth' | 'finetuning' | 'controlnet'
    batch_size: int = 1
    resolution: tuple[int, int] | None = None  # (width, height)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    # command line only (not config keys, spec §3)
    prior_loss_weight: float = 1.0
    max_token_length: int | None = None
    debug_dataset: bool = False
    subsets: list[SubsetParams] = field(default_factory=list)


_COMMON = (
    "image_dir", "num_repeats", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
    "secondary_separator", "enable_wildcard", "color_aug", "flip_aug", "face_crop_aug_range", "random_crop",
    "caption_prefix", "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step", "validation_split", "validation_seed",
)
# the parameters each style resolves; the others keep their defaults (upstream has one class per style)
SUBSET_FIELDS = {
    "dreambooth": _COMMON + ("is_reg", "class_tokens", "caption_extension", "cache_info", "alpha_mask"),
    "finetuning": _COMMON + ("metadata_file", "alpha_mask"),
    "controlnet": _COMMON + ("conditioning_data_dir", "caption_extension", "cache_info"),
}
DATASET_FIELDS = tuple(f.name for f in dataclasses.fields(DatasetParams) if f.name not in ("style", "subsets"))


def dataset_params_from_args(args: argparse.Namespace, script: str, **runtime: Any) -> list[DatasetParams]:
    """Datasets of a trainer run: config file or command line, validated and resolved (spec §1-§3)."""
    sanitizer = sanitizer_for(script, bool(getattr(args, "masked_loss", False)))
    user_config, source = user_config_from_args(args, sanitizer)
    return resolve_datasets(sanitizer.sanitize(user_config, source), args, runtime)


def user_config_from_args(args: argparse.Namespace, sanitizer: ConfigSanitizer) -> tuple[dict, str]:
    """The raw user config and a name for messages: the ``--dataset_config`` file or one generated (§1)."""
    if getattr(args, "dataset_config", None) is not None:
        ignored = [f"--{k}" for k in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
                   if getattr(args, k, None) is not None]
        if ignored:
            logger.warning("%s ignored because --dataset_config is given", ", ".join(ignored))
        return load_dataset_config(args.dataset_config), str(args.dataset_config)
    if not sanitizer.support_dreambooth and sanitizer.dataset_styles == ("controlnet",):  # the ControlNet trainers
        return controlnet_config_from_args(args), "command line (--train_data_dir, --conditioning_data_dir)"
    in_json = getattr(args, "in_json", None)
    if in_json is not None or not sanitizer.support_dreambooth:  # fine_tune.py: always (§1)
        if in_json is None:
            raise UserError("no dataset: give --in_json (fine-tuning metadata) or --dataset_config")
        subset = {"metadata_file": in_json}
        if getattr(args, "train_data_dir", None) is not None:
            subset["image_dir"] = args.train_data_dir
        return {"datasets": [{"subsets": [subset]}]}, "command line (--in_json)"
    if getattr(args, "train_data_dir", None) is None:
        raise UserError("no dataset: give --train_data_dir, --dataset_config or --in_json")
    subsets = subsets_from_folders(args.train_data_dir, is_reg=False, option="--train_data_dir")
    subsets += subsets_from_folders(getattr(args, "reg_data_dir", None), is_reg=True, option="--reg_data_dir")
    return {"datasets": [{"subsets": subsets}]}, "command line (--train_data_dir)"


def controlnet_config_from_args(args: argparse.Namespace) -> dict:
    """One ControlNet subset: ``--train_data_dir`` itself (not its sub-folders) paired with ``--conditioning_data_dir``,
    repeated once (upstream's ``generate_controlnet_subsets_config_by_subdirs``)."""
    missing = [f"--{k}" for k in ("train_data_dir", "conditioning_data_dir") if getattr(args, k, None) is None]
    if missing:
        raise UserError(f"no dataset: give {' and '.join(missing)} (image and conditioning-image folders) or "
                        "--dataset_config")
    # caption_extension comes through the command-line layer of the fallback chain
    subset = {"image_dir": args.train_data_dir, "conditioning_data_dir": args.conditioning_data_dir, "num_repeats": 1}
    return {"datasets": [{"subsets": [subset]}]}


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` → ``(10, "sks dog")``; ``None`` if the name does not start with a count (§4)."""
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


def subsets_from_folders(root: str | None, is_reg: bool, option: str) -> list[dict]:
    """One DreamBooth subset per ``N_token`` sub-folder of ``root`` (spec dataset-config §4)."""
    if root is None:
        return []
    if not os.path.isdir(root):
        raise UserError(f"{option} {root}: not a folder")
    subsets = []
    # sorted by name, unlike upstream's iterdir() order: the same run on every file system
    for sub in sorted((p for p in Path(root).iterdir() if p.is_dir()), key=lambda p: p.name):
        parsed = parse_folder_name(sub.name)
        if parsed is None:
            logger.warning("ignoring folder %s: its name must start with a repeat count, e.g. '10_%s'", sub, sub.name)
            continue
        repeats, class_tokens = parsed
        if repeats < 1:
            logger.warning("ignoring folder %s: repeat count %d < 1", sub, repeats)
            continue
        subsets.append({"image_dir": str(sub), "num_repeats": repeats, "is_reg": is_reg, "class_tokens": class_tokens})
    if not subsets:
        logger.warning("%s %s has no 'N_token' sub-folders", option, root)
    return subsets


def resolve_datasets(config: dict, args: argparse.Namespace, runtime: dict | None = None) -> list[DatasetParams]:
    """Apply the fallback chain of spec §3 to a sanitized config; drop repeated and empty subsets."""
    cli = namespace_as_config(args)
    runtime = runtime or {}
    general = config.get("general", {})
    datasets = []
    for i, dataset in enumerate(config.get("datasets", [])):
        style = dataset["_style"]
        layers = [dataset, general, cli, runtime]
        params = DatasetParams(style=style, **_resolve(DATASET_FIELDS, layers, DatasetParams))
        seen: set = set()
        for j, subset in enumerate(dataset.get("subsets", [])):
            where = f"datasets[{i}].subsets[{j}]"
            sp = SubsetParams(**_resolve(SUBSET_FIELDS[style], [subset] + layers, SubsetParams))
            if sp.num_repeats < 1:
                logger.warning("%s ignored: num_repeats = %d < 1", where, sp.num_repeats)
                continue
            ident = {"dreambooth": sp.image_dir, "finetuning": sp.metadata_file,
                     "controlnet": (sp.image_dir, sp.conditioning_data_dir)}[style]
            if ident in seen:
                logger.warning("%s ignored: the same subset (%s) is already in datasets[%d]", where, ident, i)
                continue
            seen.add(ident)
            _check_subset_paths(sp, style, where)
            if sp.caption_extension and not sp.caption_extension.startswith("."):
                sp.caption_extension = "." + sp.caption_extension
            params.subsets.append(sp)
        if style != "finetuning" and params.resolution is None:
            raise UserError(f"datasets[{i}]: resolution is required: give --resolution or 'resolution' in the "
                            "dataset config")
        datasets.append(params)
    return datasets


def namespace_as_config(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line layer of the chain: config names, parsed resolution/face-crop range (§3)."""
    cli = {ARGPARSE_TO_CONFIG.get(k, k): v for k, v in vars(args).items()}
    if cli.get("caption_extention") is not None:  # legacy misspelling wins, as prepare_dataset_args
        cli["caption_extension"] = cli["caption_extention"]
    if cli.get("resolution") is not None:
        try:
            cli["resolution"] = parse_resolution(cli["resolution"])
        except vol.Invalid:
            raise UserError(f"--resolution {cli['resolution']!r}: expected 'SIZE' or 'WIDTH,HEIGHT'") from None
    crop = cli.get("face_crop_aug_range")
    if isinstance(crop, str):
        cli["face_crop_aug_range"] = parse_face_crop_range(crop)
    return cli


def parse_face_crop_range(text: str) -> tuple[float, float]:
    """``"lo,hi"`` → ``(lo, hi)`` with lo ≤ hi (spec cli-options §3 ``prepare_dataset_args``)."""
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        raise UserError(f"--face_crop_aug_range {text!r}: expected 'lo,hi', e.g. '2.0,4.0'") from None
    if lo > hi:
        raise UserError(f"--face_crop_aug_range {text!r}: lo must not exceed hi")
    return (lo, hi)


def _resolve(names: Sequence[str], layers: Sequence[dict], klass: type) -> dict[str, Any]:
    """First non-None value per name across ``layers``, else the dataclass default (False/0 are values)."""
    defaults = {f.name: f.default for f in dataclasses.fields(klass) if f.default is not dataclasses.MISSING}
    out = {}
    for name in names:
        value = next((layer[name] for layer in layers if layer.get(name) is not None), None)
        out[name] = defaults.get(name) if value is None else value
    return out


def _check_subset_paths(sp: SubsetParams, style: str, where: str) -> None:
    if style in ("dreambooth", "controlnet") and not (sp.image_dir and os.path.isdir(sp.image_dir)):
        raise UserError(f"{where}: image_dir {sp.image_dir!r} is not a folder")
    if style == "controlnet" and not os.path.isdir(sp.conditioning_data_dir or ""):
        raise UserError(f"{where}: conditioning_data_dir {sp.conditioning_data_dir!r} is not a folder")
    if style == "finetuning" and not os.path.isfile(sp.metadata_file or ""):
        raise UserError(f"{where}: metadata_file {sp.metadata_file!r} not found")
