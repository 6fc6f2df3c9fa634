"""``ss_*`` training metadata of train_network / sdxl_train_network, spec file-formats §b.1.

The builder takes the parsed options (sd-scripts names) plus :class:`TrainingFacts`, the values only known
once data and optimizer exist. Every value is ``str(v)`` (None → "None", bools "True"/"False", tuples
"(512, 512)"); ``ss_datasets``, ``ss_tag_frequency``, ``ss_dataset_dirs``, ``ss_bucket_info`` and
``ss_network_args`` are JSON.
"""
from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from library.config.dataset_schema import parse_resolution
from library.config.option_record import OptionRecord
from library.errors import UserError
from library.formats.model_hashes_files import model_file_metadata

# Keys kept by --no_metadata (and written by the LoRA tools), in upstream's order (§b.1).
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")

BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
DATASET_KINDS = ("dreambooth", "finetuning", "controlnet")
UNKNOWN_COMMIT = "(unknown)"


@dataclass
class SubsetFacts:
    """One subset as the metadata describes it (§b.1 ``subsets``); paths are full, basenames are taken here."""

    img_count: int
    num_repeats: int
    image_dir: Optional[str] = None
    metadata_file: Optional[str] = None  # fine-tuning subsets
    class_tokens: Optional[str] = None  # DreamBooth subsets
    is_reg: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None


@dataclass
class DatasetFacts:
    """One dataset of the group; ``kind`` is ``dreambooth``, ``finetuning`` or ``controlnet``."""

    kind: str
    batch_size: int
    num_train_images: int
    num_reg_images: int
    resolution: Optional[tuple[int, int]]  # (width, height)
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    min_bucket_reso: Optional[int] = None
    max_bucket_reso: Optional[int] = None
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # {dir or json basename: {tag: n}}
    bucket_info: Optional[dict] = None  # dataset-config §7.5
    subsets: list[SubsetFacts] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"unknown dataset kind {self.kind!r}; expected one of {DATASET_KINDS}")


def new_session_id() -> int:
    """``ss_session_id``: a random int in 0..2³² that groups the files of one run."""
    return random.randint(0, 2**32)


@dataclass
class TrainingFacts:
    """What the trainer knows after building data and optimizer; the option record holds everything else."""

    family: str  # 'sd1' | 'sd2' | 'sdxl'
    num_train_images: int
    num_reg_images: int
    num_batches_per_epoch: int  # len(train_dataloader)
    num_epochs: int
    optimizer_name: str  # the whole ss_optimizer value, e.g. "torch.optim.adamw.AdamW(weight_decay=0.1)"
    datasets: list[DatasetFacts]
    v_parameterization: bool = False
    num_processes: int = 1
    session_id: int = field(default_factory=new_session_id)
    training_started_at: float = field(default_factory=time.time)
    # ss_sd_model_* / ss_vae_* keys; None → hashed from --pretrained_model_name_or_path / --vae
    model_files: Optional[dict[str, str]] = None
    max_train_steps: Optional[int] = None  # resolved from --max_train_epochs; None → --max_train_steps


def base_model_version(family: str, v_parameterization: bool) -> str:
    """``ss_base_model_version``: sd_v1, sd_v2, sd_v1_v, sd_v2_v, sdxl_base_v1-0 (§b.1); flux1 (sd-scripts' FLUX)."""
    if family not in BASE_MODEL_VERSIONS:
        raise ValueError(f"unknown model family {family!r}; expected one of {tuple(BASE_MODEL_VERSIONS)}")
    version = BASE_MODEL_VERSIONS[family]
    # upstream's SDXL trainer writes its constant; the `_v` suffix is an SD1/SD2 helper's
    return version + "_v" if v_parameterization and family not in ("sdxl", "flux") else version


@functools.lru_cache(maxsize=1)
def project_commit_hash() -> str:
    """``ss_sd_scripts_commit_hash``: ``git rev-parse HEAD`` of this project, else ``(unknown)``."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, timeout=10, check=True)
        return out.stdout.decode("ascii").strip() or UNKNOWN_COMMIT
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):  # no git, not a checkout, ...
        return UNKNOWN_COMMIT


def network_kwargs(network_args: Optional[Sequence[str]], network_dropout: Optional[float],
                   dim_from_weights: bool) -> dict[str, Any]:
    """kwargs for ``create_network``: ``key=value`` strings, plus ``dropout`` (raw) unless given or
    ``--dim_from_weights`` (upstream's LyCORIS workaround, cli-options §12)."""
    kwargs: dict[str, Any] = {}
    for pair in network_args or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--network_args {pair!r}: expected key=value")
        kwargs[key] = value
    if not dim_from_weights and "dropout" not in kwargs:
        kwargs["dropout"] = network_dropout
    return kwargs


def build_training_metadata(options: OptionRecord, facts: TrainingFacts) -> dict[str, str]:
    """The full ``ss_*`` set of §b.1 (before the per-save keys), every value a string."""
    meta = _run_keys(options, facts)
    meta.update(_recipe_keys(options, facts))
    if options.dataset_config is not None:
        meta.update(_dataset_config_keys(facts.datasets))
    else:
        meta.update(_single_dataset_keys(options, facts))
    if options.network_args:  # only when given at all, though the kwargs also carry the added dropout
        kwargs = network_kwargs(options.network_args, options.network_dropout, options.dim_from_weights)
        meta["ss_network_args"] = json.dumps(kwargs)
    files = facts.model_files
    if files is None:
        files = model_file_metadata(options.pretrained_model_name_or_path, options.vae)
    meta.update(files)
    return {k: str(v) for k, v in meta.items()}


def _run_keys(options: OptionRecord, facts: TrainingFacts) -> dict[str, Any]:
    """Run identity, schedule, network and precision keys (§b.1 'Always', first half)."""
    return {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.training_started_at,
        "ss_output_name": options.output_name,
        "ss_learning_rate": options.learning_rate,
        "ss_text_encoder_lr": options.text_encoder_lr,
        "ss_unet_lr": options.unet_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": options.gradient_checkpointing,
        "ss_gradient_accumulation_steps": options.gradient_accumulation_steps,
        "ss_max_train_steps": options.max_train_steps if facts.max_train_steps is None else facts.max_train_steps,
        "ss_lr_warmup_steps": options.lr_warmup_steps,
        "ss_lr_scheduler": options.lr_scheduler,
        "ss_network_module": options.network_module,
        "ss_network_dim": options.network_dim,
        "ss_network_alpha": options.network_alpha,
        "ss_network_dropout": options.network_dropout,
        "ss_mixed_precision": options.mixed_precision,
        "ss_full_fp16": bool(options.full_fp16),
        "ss_v2": bool(options.v2),
        "ss_base_model_version": base_model_version(facts.family, facts.v_parameterization),
        "ss_clip_skip": options.clip_skip,
        "ss_max_token_length": options.max_token_length,
        # upstream turns --cache_latents_to_disk into --cache_latents before writing this
        "ss_cache_latents": bool(options.cache_latents or options.get("cache_latents_to_disk", False)),
        "ss_seed": options.seed,
        "ss_lowram": options.lowram,
    }


def _recipe_keys(options: OptionRecord, facts: TrainingFacts) -> dict[str, Any]:
    """Noise, loss, caption and optimizer keys (§b.1 'Always', second half)."""
    return {
        "ss_noise_offset": options.noise_offset,
        "ss_multires_noise_iterations": options.multires_noise_iterations,
        "ss_multires_noise_discount": options.multires_noise_discount,
        "ss_adaptive_noise_scale": options.adaptive_noise_scale,
        "ss_zero_terminal_snr": options.zero_terminal_snr,
        "ss_training_comment": options.training_comment,
        "ss_sd_scripts_commit_hash": project_commit_hash(),
        "ss_optimizer": facts.optimizer_name,
        "ss_max_grad_norm": options.max_grad_norm,
        "ss_caption_dropout_rate": options.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": options.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": options.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": _float_pair(options.face_crop_aug_range),
        "ss_prior_loss_weight": options.prior_loss_weight,
        "ss_min_snr_gamma": options.min_snr_gamma,
        "ss_scale_weight_norms": options.scale_weight_norms,
        "ss_ip_noise_gamma": options.ip_noise_gamma,
        "ss_debiased_estimation": bool(options.debiased_estimation_loss),
        "ss_noise_offset_random_strength": options.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": options.ip_noise_gamma_random_strength,
        "ss_loss_type": options.loss_type,
        "ss_huber_schedule": options.huber_schedule,
        "ss_huber_c": options.huber_c,
    }


def visible_dataset(ds: DatasetFacts) -> DatasetFacts:
    """The dataset as the metadata sees it: a ControlNet-style dataset hides its inner DreamBooth dataset,
    so only batch size, resolution and image counts stay real (§b.1)."""
    if ds.kind != "controlnet":
        return ds
    return replace(ds, enable_bucket=False, bucket_no_upscale=False, min_bucket_reso=None,
                   max_bucket_reso=None, tag_frequency={}, bucket_info=None, subsets=[])


def _dataset_config_keys(datasets: Sequence[DatasetFacts]) -> dict[str, str]:
    """``ss_datasets``, ``ss_tag_frequency``, ``ss_dataset_dirs`` with ``--dataset_config`` (§b.1)."""
    datasets = [visible_dataset(ds) for ds in datasets]
    tag_frequency: dict[str, dict[str, int]] = {}
    dataset_dirs: dict[str, dict[str, int]] = {}
    for ds in datasets:
        for subset in ds.subsets:
            name = _subset_dir_name(ds.kind, subset)
            if name is None:
                continue
            unique, i = name, 2
            while unique in dataset_dirs:  # the same folder in several subsets: "dir (2)", "dir (3)", ...
                unique, i = f"{name} ({i})", i + 1
            dataset_dirs[unique] = _dir_info(subset)
        for dir_name, freq in ds.tag_frequency.items():
            tag_frequency.setdefault(dir_name, freq)  # first dataset using a dir wins
    return {
        "ss_datasets": json.dumps([dataset_entry(ds) for ds in datasets]),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
    }


def _subset_dir_name(kind: str, subset: SubsetFacts) -> Optional[str]:
    """A subset's ``ss_dataset_dirs`` key: the metadata file's basename (FT) or the image folder's (DB);
    None for regularization subsets, which are not listed."""
    if kind == "finetuning":
        return os.path.basename(subset.metadata_file or "")
    if subset.is_reg or not subset.image_dir:
        return None
    return os.path.basename(subset.image_dir)


def _dir_info(subset: SubsetFacts) -> dict[str, int]:
    return {"n_repeats": subset.num_repeats, "img_count": subset.img_count}


def dataset_entry(ds: DatasetFacts) -> dict[str, Any]:
    """One element of the ``ss_datasets`` JSON list (§b.1), ControlNet rule applied."""
    ds = visible_dataset(ds)
    width, height = ds.resolution if ds.resolution is not None else (None, None)
    return {
        "is_dreambooth": ds.kind == "dreambooth",
        "batch_size_per_device": ds.batch_size,
        "num_train_images": ds.num_train_images,
        "num_reg_images": ds.num_reg_images,
        "resolution": [width, height],
        "enable_bucket": bool(ds.enable_bucket),
        "min_bucket_reso": ds.min_bucket_reso,
        "max_bucket_reso": ds.max_bucket_reso,
        "tag_frequency": ds.tag_frequency,
        "bucket_info": ds.bucket_info,
        "subsets": [_subset_entry(ds.kind, s) for s in ds.subsets],
    }


def _subset_entry(kind: str, s: SubsetFacts) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "img_count": s.img_count,
        "num_repeats": s.num_repeats,
        "color_aug": bool(s.color_aug),
        "flip_aug": bool(s.flip_aug),
        "random_crop": bool(s.random_crop),
        "shuffle_caption": bool(s.shuffle_caption),
        "keep_tokens": s.keep_tokens,
        "keep_tokens_separator": s.keep_tokens_separator,
        "secondary_separator": s.secondary_separator,
        "enable_wildcard": bool(s.enable_wildcard),
        "caption_prefix": s.caption_prefix,
        "caption_suffix": s.caption_suffix,
    }
    if s.image_dir:
        entry["image_dir"] = os.path.basename(s.image_dir)
    if kind == "dreambooth":
        entry["class_tokens"] = s.class_tokens
        entry["is_reg"] = s.is_reg
    else:
        entry["metadata_file"] = os.path.basename(s.metadata_file or "")
    return entry


def _single_dataset_keys(options: OptionRecord, facts: TrainingFacts) -> dict[str, Any]:
    """Keys written without ``--dataset_config``: one dataset, options read from ``args`` (§b.1)."""
    if len(facts.datasets) != 1:
        raise ValueError(f"without --dataset_config there is one dataset, got {len(facts.datasets)}")
    ds = visible_dataset(facts.datasets[0])
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    for subset in ds.subsets:
        # no " (2)" suffixes here: a repeated folder name overwrites, as upstream
        if ds.kind == "finetuning":
            dirs[os.path.basename(subset.metadata_file or "")] = _dir_info(subset)
        elif subset.image_dir:
            (reg_dirs if subset.is_reg else dirs)[os.path.basename(subset.image_dir)] = _dir_info(subset)
    resolution = None if options.resolution is None else parse_resolution(options.resolution)
    return {
        "ss_batch_size_per_device": options.train_batch_size,
        "ss_total_batch_size": options.train_batch_size * facts.num_processes * options.gradient_accumulation_steps,
        "ss_resolution": resolution,
        "ss_color_aug": bool(options.color_aug),
        "ss_flip_aug": bool(options.flip_aug),
        "ss_random_crop": bool(options.random_crop),
        "ss_shuffle_caption": bool(options.shuffle_caption),
        "ss_enable_bucket": bool(ds.enable_bucket),
        "ss_bucket_no_upscale": bool(ds.bucket_no_upscale),
        "ss_min_bucket_reso": ds.min_bucket_reso,
        "ss_max_bucket_reso": ds.max_bucket_reso,
        "ss_keep_tokens": options.keep_tokens,
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(ds.tag_frequency),
        "ss_bucket_info": json.dumps(ds.bucket_info),
    }


def _float_pair(value: Any) -> Optional[tuple[float, ...]]:
    """``--face_crop_aug_range`` as upstream holds it when writing: a tuple of floats ("2,4" → (2.0, 4.0))."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    return tuple(float(v) for v in value)


def build_minimum_network_metadata(
    v2: Any,
    base_model_version: Optional[str],
    network_module: str,
    dim: Any,
    alpha: Any,
    network_args: Optional[Mapping[str, Any] | str],
) -> dict[str, str]:
    """The minimum ``ss_*`` set the LoRA tools write (dim/alpha may be ``"Dynamic"``), §b.1.

    ``v2``, ``base_model_version`` and ``network_args`` are omitted when None; a dict ``network_args`` is
    written as JSON, a string (read from another file) as is.
    """
    meta: dict[str, str] = {"ss_network_module": network_module, "ss_network_dim": str(dim),
                            "ss_network_alpha": str(alpha)}
    if v2 is not None:
        meta["ss_v2"] = str(v2)
    if base_model_version is not None:
        meta["ss_base_model_version"] = base_model_version
    if network_args is not None:
        meta["ss_network_args"] = network_args if isinstance(network_args, str) else json.dumps(network_args)
    return meta


def minimum_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The ``--no_metadata`` subset of a full ``ss_*`` dict (those of :data:`MINIMUM_KEYS` present)."""
    return {k: metadata[k] for k in MINIMUM_KEYS if k in metadata}


def ss_epoch_value(event: str, loop_epoch: int, num_epochs: int) -> int:
    """``ss_epoch``: step saves the 0-based loop epoch, epoch saves ``loop_epoch + 1``, the final save
    the number of epochs (§b.1)."""
    if event == "step":
        return loop_epoch
    if event == "epoch":
        return loop_epoch + 1
    if event == "final":
        return num_epochs
    raise ValueError(f"unknown save event {event!r}; expected 'step', 'epoch' or 'final'")


def metadata_for_save(
    metadata: Mapping[str, str],
    *,
    global_step: int,
    epoch: int,
    no_metadata: bool,
    modelspec: Mapping[str, str],
    finished_at: Optional[float] = None,
) -> dict[str, str]:
    """The header of one save: ``ss_*`` + per-save keys (or the minimum set with ``--no_metadata``) ∪ modelspec.

    ``epoch`` is the ``ss_epoch`` value (see :func:`ss_epoch_value`); ``sshs_*`` are added by the writer.
    """
    if no_metadata:
        # upstream's minimum dict never receives the per-save keys
        out = minimum_metadata(metadata)
    else:
        out = dict(metadata)
        out["ss_training_finished_at"] = str(time.time() if finished_at is None else finished_at)
        out["ss_steps"] = str(global_step)
        out["ss_epoch"] = str(epoch)
    out.update(modelspec)
    return out
