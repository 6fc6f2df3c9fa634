"""Everything a trainer can know before it loads a model, checked in one place (the real run and --dry_run).

Order: option ranges, input files (exist, readable header, expected model family), the packages and
plug-ins the options name (optimizer, scheduler, network module, trackers, attention, DeepSpeed), then the
output folder (creatable, writable, free space). Each problem is one ``UserError`` naming the option and
the file or package; a short disk is a warning with both numbers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from library.config.options import TEXTUAL_INVERSION_SCRIPTS, build_parser
from library.config.options_flux import FLUX_SCRIPT
from library.config.ranges import check_ranges
from library.errors import UserError
from library.models.checkpoint_io import CheckpointReader
from library.models.flux_loading import is_flux
from library.models.loading import check_family_flags, peek_family
from library.training.loop.state_checks import check_rng_file, read_train_state
from library.training.objective.latent_memo import check_budget as check_latent_memo_budget
from library.training.optim.lr_schedules import check_scheduler
from library.training.optim.optimizers import check_optimizer, parse_kwargs
from library.training.runners.flux_checks import FLUX_NETWORK_MODULE, check_flux_model_inputs
from networks.lora_family import check_file_for_family, read_tensor_file
from networks.network_host import import_network_module, parse_network_args

logger = logging.getLogger(__name__)

SDXL_SCRIPTS = ("sdxl_train_network", "sdxl_train_textual_inversion", "sdxl_train")
NETWORK_SCRIPTS = ("train_network", "sdxl_train_network", FLUX_SCRIPT)
# the sd-scripts script that trains the same thing on SDXL
SDXL_COUNTERPART = {"train_network": "sdxl_train_network.py",
                    "train_db": "sdxl_train.py",
                    "fine_tune": "sdxl_train.py",
                    "train_textual_inversion": "sdxl_train_textual_inversion.py"}
SDXL_SCRIPTS += ("sdxl_train_control_net_lllite",)
SDXL_COUNTERPART["train_controlnet"] = "sdxl_train_control_net_lllite.py (ControlNet-LLLite)"
# package to import -> pip name, for options that need an optional package
_PIP_NAMES = {"xformers": "xformers", "deepspeed": "deepspeed", "wandb": "wandb", "tensorboard": "tensorboard"}


def preflight(args: argparse.Namespace, script: str) -> None:
    """Run every check of this module for ``script`` (e.g. "train_network")."""
    check_ranges(args, build_parser(script))
    check_latent_memo_budget()
    if not getattr(args, "max_train_steps", 1) and not getattr(args, "max_train_epochs", None):
        raise UserError("--max_train_steps 0 trains nothing: give a number of steps, or --max_train_epochs")
    family = check_model_inputs(args, script)
    check_other_inputs(args, script, family)
    check_packages(args, script)
    check_output(args, script)


# ---------------------------------------------------------------- inputs

def check_model_inputs(args: argparse.Namespace, script: str) -> Optional[str]:
    """The base model exists, its header reads, and its family fits the script and --v2; returns the family
    (None for a hub id or a legacy pickle, which only loading can tell)."""
    path = getattr(args, "pretrained_model_name_or_path", None)
    if not path:
        raise UserError("--pretrained_model_name_or_path is required: the base model file or Diffusers folder")
    path = str(path)
    if not os.path.exists(path):
        if _looks_like_hub_id(path):
            logger.info("--pretrained_model_name_or_path %s is not a local path; it is loaded as a hub id", path)
            return None
        raise UserError(f"--pretrained_model_name_or_path {path}: no such file or folder")
    _readable(path, "--pretrained_model_name_or_path")
    if script == FLUX_SCRIPT:
        return check_flux_model_inputs(args)
    if is_flux(path):  # a Diffusers FLUX folder would otherwise pass for SDXL (it has text_encoder_2/)
        raise UserError(f"--pretrained_model_name_or_path {path} is a FLUX.1 model; {script}.py trains Stable "
                        "Diffusion: use flux_train_network.py")
    family = peek_family(path)
    if family == "sdxl" and script in SDXL_COUNTERPART:
        raise UserError(f"{path} is an SDXL model; {script}.py trains SD 1.x / 2.x models: use "
                        f"{SDXL_COUNTERPART[script]}")
    if family is not None:
        check_family_flags(family, path, bool(getattr(args, "v2", False)), script in SDXL_SCRIPTS)
    vae = getattr(args, "vae", None)
    if vae:
        _must_exist(vae, "--vae")
        _check_vae(str(vae))
    return family


def _check_vae(path: str) -> None:
    """``--vae`` is a VAE: a Diffusers VAE folder (or a model folder with ``vae/``), or a file whose header
    holds VAE tensors (a VAE alone, or a whole model)."""
    if os.path.isdir(path):
        if not (os.path.isfile(os.path.join(path, "config.json"))
                or os.path.isfile(os.path.join(path, "vae", "config.json"))):
            raise UserError(f"--vae {path}: folder is neither a Diffusers VAE nor a model folder with vae/")
        return
    if Path(path).suffix.lower() != ".safetensors":
        return  # a pickle lists its tensors only when loaded whole: the loader checks it
    reader = CheckpointReader(path)  # an unreadable header is one line naming the file
    try:
        keys = reader.keys()
    finally:
        reader.close()
    markers = ("first_stage_model.", "encoder.", "decoder.", "quant_conv", "encoder.down_blocks")
    if not any(k.startswith(markers) for k in keys):
        raise UserError(f"--vae {path}: no VAE tensors in this file (expected encoder./decoder. or "
                        "first_stage_model. names)")


def check_other_inputs(args: argparse.Namespace, script: str, family: Optional[str]) -> None:
    """Every other file an option names exists (and, for network files, fits the model family)."""
    for option in ("sample_prompts", "log_tracker_config", "weights", "dataset_config"):
        value = getattr(args, option, None)
        if value:
            _must_exist(str(value), f"--{option}", want="file")
    for option in ("train_data_dir", "reg_data_dir", "conditioning_data_dir"):
        value = getattr(args, option, None)
        if value and not getattr(args, "dataset_config", None):
            _must_exist(str(value), f"--{option}", want="folder")
    in_json = getattr(args, "in_json", None)
    if in_json and not getattr(args, "dataset_config", None):
        _must_exist(in_json, "--in_json", want="file")
        _json_file(in_json, "--in_json")
    resume = getattr(args, "resume", None)
    if resume and not getattr(args, "resume_from_huggingface", False):
        _must_exist(resume, "--resume", want="folder")

        read_train_state(resume)  # a damaged train_state.json: one line now, not after loading
        check_rng_file(int(os.environ.get("RANK", "0")), resume, bool(getattr(args, "resume_inexact", False)),
                       warn=False)  # the loud warning comes once, when the state is restored
    network_files = [("--network_weights", getattr(args, "network_weights", None))]
    network_files += [("--base_weights", f) for f in getattr(args, "base_weights", None) or []]
    for option, file in network_files:
        if file:
            _must_exist(file, option, want="file")
            _check_network_file(file, option, family)


def _check_network_file(path: str, option: str, family: Optional[str]) -> None:
    """Readable, and a LoRA for another model family is refused, before any model loads
    (networks/lora_family.py reads the header only)."""
    if family is None:
        read_tensor_file(path, option)
    else:
        check_file_for_family(path, family, option)


def _must_exist(path: str, option: str, want: str = "") -> None:
    if not os.path.exists(path):
        raise UserError(f"{option} {path}: no such {want or 'file or folder'}")
    if want == "file" and os.path.isdir(path):
        raise UserError(f"{option} {path}: is a folder, expected a file")
    if want == "folder" and not os.path.isdir(path):
        raise UserError(f"{option} {path}: is a file, expected a folder")
    _readable(path, option)


def _readable(path: str, option: str) -> None:
    if not os.access(path, os.R_OK):
        raise UserError(f"{option} {path}: permission denied (not readable)")


def _json_file(path: str, option: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{option} {path}: not a valid UTF-8 JSON file ({e})") from None


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and "\\" not in path \
        and not os.path.splitext(path)[1]


# ---------------------------------------------------------------- packages and plug-ins

def check_packages(args: argparse.Namespace, script: str) -> None:
    """Optimizer, scheduler, network module, trackers, attention and DeepSpeed resolve or import."""
    check_optimizer(args.optimizer_type, getattr(args, "use_8bit_adam", False),
                    getattr(args, "use_lion_optimizer", False))
    parse_kwargs(getattr(args, "optimizer_args", None))
    check_scheduler(args.lr_scheduler, getattr(args, "lr_scheduler_type", ""),
                    getattr(args, "lr_scheduler_args", None), args.optimizer_type)
    if script in NETWORK_SCRIPTS:
        default = FLUX_NETWORK_MODULE if script == FLUX_SCRIPT else "networks.lora"
        import_network_module(args.network_module or default)
        parse_network_args(getattr(args, "network_args", None))
    log_with = getattr(args, "log_with", None)
    if log_with in ("wandb", "all"):
        _need("wandb", "--log_with " + log_with)
    if log_with in ("tensorboard", "all") or (getattr(args, "logging_dir", None) and not log_with):
        if not (_importable("tensorboard") or _importable("tensorboardX")):
            raise UserError("--logging_dir logs to TensorBoard, which needs tensorboard: pip install tensorboard")
    if getattr(args, "xformers", False) or getattr(args, "diffusers_xformers", False):
        _need("xformers", "--xformers")
    if getattr(args, "deepspeed", False):
        _need("deepspeed", "--deepspeed")


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _need(module: str, option: str) -> None:
    if not _importable(module):
        pip = _PIP_NAMES.get(module, module)
        raise UserError(f"{option} needs {module}, which is not installed: pip install {pip}")


# ---------------------------------------------------------------- output

def check_output(args: argparse.Namespace, script: str) -> None:
    """``--output_dir`` can be created and written, and (a warning) has room for the files the run keeps."""
    out = getattr(args, "output_dir", None)
    if not out:
        raise UserError("--output_dir is required: the folder the trained files are saved to")
    if getattr(args, "output_name", None) == "":
        raise UserError("--output_name is empty: give a file name (without extension) or leave it unset")
    out = os.path.abspath(str(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out}: is a file, expected a folder")
    existing = _nearest_existing(out)
    if not os.path.isdir(existing):
        raise UserError(f"--output_dir {out}: cannot be created, {existing} is a file")
    _probe_write(existing, out)
    need = estimate_output_bytes(args, script)
    if need:
        free = shutil.disk_usage(existing).free
        if free < need:
            logger.warning("--output_dir %s: %.1f MiB free, but the files this run keeps need about %.1f MiB "
                           "(a rough estimate); saving may fail", out, free / 2**20, need / 2**20)


def _nearest_existing(path: str) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def _probe_write(folder: str, out: str) -> None:
    """Create and remove a file in ``folder`` (the output folder or its nearest existing parent)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sdt-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "" if folder == out else f" (it would be created inside {folder})"
        raise UserError(f"--output_dir {out}{what}: not writable ({e.strerror or e})") from None


def estimate_output_bytes(args: argparse.Namespace, script: str) -> int:
    """Rough size of the files the run keeps: model files x how many are kept, plus state folders."""
    model = getattr(args, "pretrained_model_name_or_path", None)
    if not model or not os.path.isfile(str(model)):
        return 0
    model_bytes = os.path.getsize(str(model))
    if script in NETWORK_SCRIPTS:
        dim = getattr(args, "network_dim", None) or 4
        one = max(model_bytes // 2 * dim // 320, 1 << 20)  # LoRA ~ dim/320 of the fp16 model (SD1.5: dim 32 ~ 37 MB)
    elif script in TEXTUAL_INVERSION_SCRIPTS:
        one = 1 << 20
    elif script == "sdxl_train_control_net_lllite":
        one = 256 << 20  # released LLLites are 50-200 MB
    else:
        one = model_bytes
    kept = 1 + _kept_intermediate_saves(args)
    state = 3 * one if (getattr(args, "save_state", False) or getattr(args, "save_state_on_train_end", False)) else 0
    return one * kept + state


def _kept_intermediate_saves(args: argparse.Namespace) -> int:
    steps = getattr(args, "max_train_steps", None) or 0
    every = getattr(args, "save_every_n_steps", None)
    count = steps // every if every else 0
    if every and getattr(args, "save_last_n_steps", None):
        count = min(count, args.save_last_n_steps // every + 1)
    epochs = getattr(args, "max_train_epochs", None)
    every_epochs = getattr(args, "save_every_n_epochs", None)
    if epochs and every_epochs:
        n = epochs // every_epochs
        if getattr(args, "save_last_n_epochs", None):
            n = min(n, args.save_last_n_epochs)
        count += n
    return count
