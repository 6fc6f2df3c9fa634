#!/usr/bin/env python
"""Merge LoRA files into a Stable Diffusion checkpoint, or into one LoRA (spec utilities §7).

With ``--sd_model``: every LoRA module adds ``ratio·(alpha/rank)·up@down`` to the weight it targets
(4-D 1x1 factors squeezed for Linear layers, 3x3 through conv composition); the result is written by
the checkpoint writer, keeping every other tensor of the source file. Without it the LoRAs become one
LoRA (``--concat``/``--shuffle``), with sd-scripts' scaling, which is quadratic in the ratio (pitfall 4).
``sdxl_merge_lora.py`` is this script for SDXL.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from networks import oft  # noqa: E402
from networks.lora_family import SD1_OR_SD2, SD2, SDXL, check_fits_layers, check_same_family  # noqa: E402
from networks.lora_modules import fit_to_shape  # noqa: E402
from library.formats.tensor_file import read_tensor_file  # noqa: E402
from networks.lora_svd import module_delta  # noqa: E402
from networks.lora_targets import target_layers, target_weight_shapes  # noqa: E402
from networks.lora_tool_io import (check_inputs_exist, check_lora_output, complete_modules, merged_from,  # noqa: E402
                                   module_alpha, precision_dtype, read_lora, save_lora)
from library.models.checkpoint_io import CheckpointReader  # noqa: E402
from library.models.loading import load_models  # noqa: E402
from library.models.saving import save_ldm_checkpoint  # noqa: E402
from library.formats.modelspec import build_modelspec  # noqa: E402
from library.formats.metadata import build_minimum_network_metadata  # noqa: E402

logger = logging.getLogger(__name__)

HASH_NOTE = ("sshs_* hashes are computed after the cast to --save_precision, so they match the saved file "
             "(sd-scripts v0.8.7 hashed before the cast)")


def build_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    """Options of spec §7; the SDXL script has no ``--v2``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=HASH_NOTE)
    if not sdxl:
        p.add_argument("--v2", action="store_true", help="the base model / LoRAs are for SD 2.x")
    p.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of the saved tensors (default: the merge precision). " + HASH_NOTE)
    p.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                   help="dtype of the merge arithmetic (default: float)")
    p.add_argument("--sd_model", type=str, default=None,
                   help="base checkpoint (.ckpt/.safetensors or Diffusers folder); if omitted, the LoRAs are "
                        "merged into one LoRA")
    p.add_argument("--save_to", type=str, default=None,
                   help="output file: a checkpoint with --sd_model, else a LoRA (.ckpt/.pt/.safetensors)")
    p.add_argument("--models", type=str, nargs="*", help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", help="one ratio per LoRA file")
    p.add_argument("--no_metadata", action="store_true",
                   help="do not write modelspec metadata (a merged LoRA still gets the minimum ss_* keys)")
    p.add_argument("--concat", action="store_true",
                   help="LoRA+LoRA: concatenate the ranks instead of summing the factors (each contribution is "
                        "then also scaled by rank_i / total rank)")
    p.add_argument("--shuffle", action="store_true", help="LoRA+LoRA: randomly permute each module's rank axis")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it (wrappers import it)


# ------------------------------------------------------------------------------ into a checkpoint

@torch.no_grad()
def merge_into_models(models, paths: list[str], ratios: list[float], dtype: torch.dtype) -> int:
    """``W += ratio·(alpha/rank)·up@down`` for every LoRA module with a target; returns unmatched count.

    The delta is composed in float32 and added in the merge dtype.
    """
    layers = target_layers(models.text_encoders, models.unet)
    unmatched = 0
    for path, ratio in zip(paths, ratios):
        if is_oft_file(read_tensor_file(path, "--models")):
            unmatched += merge_oft(models, path, ratio, dtype)
            continue
        sd, _ = read_lora(path)
        missing = []
        for name, parts in complete_modules(sd, path).items():
            layer = layers.get(name)
            if layer is None:
                missing.append(name)
                continue
            delta = module_delta(parts["lora_up.weight"], parts["lora_down.weight"], module_alpha(parts)) * ratio
            weight = layer.weight
            layer.weight.data = weight.data.to(dtype) + fit_to_shape(delta, weight.shape).to(weight.device, dtype)
        for name in missing:
            logger.warning("%s: no layer for LoRA module %s: skipped", path, name)
        unmatched += len(missing)
        logger.info("merged %s x %s", path, ratio)
    return unmatched


def is_oft_file(tf) -> bool:
    """An ``networks.oft`` file: ``oft_unet_*.oft_blocks`` tensors instead of LoRA factors."""
    return any(key.endswith(".oft_blocks") for key in tf.shapes)


def merge_oft(models, path: str, ratio: float, dtype: torch.dtype) -> int:
    """Rotate each named layer's output channels into its weight and bias (networks.oft's merge, ``ratio`` as the
    multiplier); returns how many of the file's modules name no layer."""
    network, sd = oft.create_network_from_weights(ratio, path, None, models.text_encoders, models.unet)
    network.load_state_dict(sd, strict=False)
    for module in network.unet_ofts:
        module.merge_into_layer(dtype=dtype)
    names = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".oft_blocks")}
    missing = sorted(names - {m.oft_name for m in network.unet_ofts})
    for name in missing:
        logger.warning("%s: no layer for OFT module %s: skipped", path, name)
    logger.info("merged OFT %s x %s", path, ratio)
    return len(missing)


def _check_oft_fits(tf, models) -> None:
    names = {k.rsplit(".", 1)[0]: shape for k, shape in tf.shapes.items() if k.endswith(".oft_blocks")}
    widths = {name: width for name, width in oft.target_widths(models.unet).items() if name in names}
    if not widths:
        raise UserError(f"--models {tf.path}: none of its {len(names)} OFT modules names a layer of this model "
                        f"(e.g. {next(iter(names), '-')}): it would be ignored")
    for name, width in widths.items():
        n, b, _ = names[name]
        if n * b != width:
            raise UserError(f"--models {tf.path}: tensor {name}.oft_blocks has shape ({n}, {b}, {b}) but the "
                            f"layer has {width} output channels: an OFT for a model of other widths")


def merge_into_checkpoint(args: argparse.Namespace, sdxl: bool, merge_dtype: torch.dtype,
                          save_dtype: torch.dtype) -> None:
    """Load the base, check every LoRA fits it, merge, save with the source file's other tensors kept (§7)."""
    files = check_same_family(args.models, "--models")  # unreadable / mixed inputs fail before loading
    v2 = bool(getattr(args, "v2", False))
    models = load_models(args.sd_model, v2=v2, sdxl=sdxl, dtype=merge_dtype)
    # a LoRA of another model would merge nothing and the unchanged model would be written as "merged"
    shapes = target_weight_shapes(models.text_encoders, models.unet)
    for tf in files:
        if is_oft_file(tf):
            _check_oft_fits(tf, models)
        else:
            check_fits_layers(tf, shapes, models.family, "--models")
    merge_into_models(models, args.models, args.ratios, merge_dtype)
    metadata = None
    if not args.no_metadata and args.save_to.lower().endswith(".safetensors"):
        if models.family == "sd2":
            logger.warning("SD2 merge: labelled v-prediction in modelspec (the file cannot tell)")
        metadata = build_modelspec(models.family, models.family == "sd2", "checkpoint",
                                   title=Path(args.save_to).stem,
                                   merged_from=merged_from([args.sd_model] + list(args.models)))
    source = {}
    if os.path.isfile(args.sd_model):  # keep EMA and other tensors the models do not hold
        reader = CheckpointReader(args.sd_model)
        source = dict(reader.items())
        reader.close()
    save_ldm_checkpoint(models, args.save_to, save_dtype, metadata, source_extra=source)
    logger.info("saved merged model %s", args.save_to)


# ------------------------------------------------------------------------------ LoRA + LoRA

@dataclass
class MergedLoRA:
    """A merged LoRA state dict and what its minimum metadata needs."""

    state_dict: dict[str, torch.Tensor]
    v2: str | None
    base_model_version: str | None
    dim: str
    alpha: str


def _combine(old: torch.Tensor | None, new: torch.Tensor, concat_dim: int | None, name: str) -> torch.Tensor:
    if old is None:
        return new
    if concat_dim is not None:
        return torch.cat([old, new], dim=concat_dim)
    if old.shape != new.shape:
        raise UserError(f"module {name}: ranks differ ({tuple(old.shape)} vs {tuple(new.shape)}); "
                        "use --concat, or svd_merge_lora.py")
    return old + new


def merge_lora_files(paths: list[str], ratios: list[float], dtype: torch.dtype, concat: bool = False,
                     shuffle: bool = False) -> MergedLoRA:
    """sd-scripts' LoRA+LoRA merge (§7): factors scaled by s = √(alpha_i/base_alpha)·ratio_i (up by |s|).

    A model thus contributes ``ratio·|ratio|·(alpha_i/rank_i)·up@down`` and sums of factors add cross
    terms; that is upstream's behaviour, kept for compatible output (pitfall 4) and warned about.
    """
    if any(abs(r) not in (0.0, 1.0) for r in ratios):
        logger.warning("LoRA+LoRA merge scales each model by ratio*|ratio| (quadratic in the ratio, as "
                       "sd-scripts); use svd_merge_lora.py for a merge linear in the ratios")
    ups: dict[str, torch.Tensor] = {}
    downs: dict[str, torch.Tensor] = {}
    base_alphas: dict[str, float] = {}
    v2 = base_model = None
    for path, ratio in zip(paths, ratios):
        sd, meta = read_lora(path, dtype)
        v2 = v2 if v2 is not None else meta.get("ss_v2")
        base_model = base_model if base_model is not None else meta.get("ss_base_model_version")
        for name, parts in complete_modules(sd, path).items():
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            alpha = module_alpha(parts) or float(down.shape[0])  # missing or 0: alpha = rank (§a.2)
            base = base_alphas.setdefault(name, alpha)
            scale = math.sqrt(alpha / base) * ratio
            downs[name] = _combine(downs.get(name), down * scale, 0 if concat else None, name)
            ups[name] = _combine(ups.get(name), up * abs(scale), 1 if concat else None, name)
    out: dict[str, torch.Tensor] = {}
    for name, base in base_alphas.items():
        down, up = downs[name], ups[name]
        if shuffle:
            perm = torch.randperm(down.shape[0])
            down, up = down[perm], up[:, perm]
        out.update({f"{name}.alpha": torch.tensor(base), f"{name}.lora_down.weight": down,
                    f"{name}.lora_up.weight": up})
    dims = {downs[n].shape[0] for n in downs}
    alphas = set(base_alphas.values())
    return MergedLoRA(out, v2, base_model, str(dims.pop()) if len(dims) == 1 else "Dynamic",
                      str(alphas.pop()) if len(alphas) == 1 else "Dynamic")


def merge_loras_to_file(args: argparse.Namespace, sdxl: bool, merge_dtype: torch.dtype,
                        save_dtype: torch.dtype) -> None:
    """LoRA+LoRA with minimum metadata, modelspec (unless --no_metadata) and hashes of the saved bytes."""
    check_lora_output(args.save_to)
    if sdxl:
        expected, against = SDXL, "sdxl_merge_lora.py merges SDXL LoRAs (use merge_lora.py)"
    elif getattr(args, "v2", False):
        expected, against = SD2, "--v2 says the LoRAs are for SD2"
    else:
        expected, against = SD1_OR_SD2, "merge_lora.py merges SD1/SD2 LoRAs (use sdxl_merge_lora.py)"
    for tf in check_same_family(args.models, "--models", expected, against):
        if is_oft_file(tf):
            raise UserError(f"--models {tf.path} is an OFT file: OFT rotations do not add up into one LoRA; merge "
                            "it into a model with --sd_model")
    merged = merge_lora_files(args.models, args.ratios, merge_dtype, args.concat, args.shuffle)
    v2 = merged.v2
    if v2 is None and sdxl:
        v2 = "False"
    base_model = merged.base_model_version or ("sdxl_base_v1-0" if sdxl else None)
    metadata = build_minimum_network_metadata(v2, base_model, "networks.lora", merged.dim, merged.alpha, None)
    if not args.no_metadata:
        is_v2 = not sdxl and (bool(getattr(args, "v2", False)) or v2 == "True")
        if is_v2:
            logger.warning("cannot tell whether the LoRA is for v-prediction: modelspec says v-prediction")
        family = "sdxl" if sdxl else ("sd2" if is_v2 else "sd1")
        metadata.update(build_modelspec(family, is_v2, "lora", title=Path(args.save_to).stem,
                                        merged_from=merged_from(args.models)))
    save_lora(merged.state_dict, args.save_to, save_dtype, metadata)
    logger.info("saved merged LoRA %s", args.save_to)


# ------------------------------------------------------------------------------ entry

def check_args(args: argparse.Namespace) -> None:
    """Inputs before any loading: files exist, one ratio per model, an output name."""
    if not args.models:
        raise UserError("--models: give at least one LoRA file")
    if args.ratios is None or len(args.ratios) != len(args.models):
        raise UserError(f"--ratios: give one ratio per model ({len(args.models)} models, "
                        f"{len(args.ratios or [])} ratios)")
    if not args.save_to:
        raise UserError("--save_to is required")
    check_inputs_exist(args.models, "--models")
    if args.sd_model is not None and not os.path.exists(args.sd_model):
        raise UserError(f"--sd_model: no such file or folder: {args.sd_model}")
    if args.sd_model is not None and (args.concat or args.shuffle):
        logger.warning("--concat/--shuffle only apply to LoRA+LoRA merges: ignored")


def run(args: argparse.Namespace, sdxl: bool) -> None:
    """Dispatch on ``--sd_model`` after checking the inputs."""
    check_args(args)
    merge_dtype = precision_dtype(args.precision, "--precision")
    save_dtype = precision_dtype(args.save_precision, "--save_precision", merge_dtype)
    if args.sd_model is not None:
        merge_into_checkpoint(args, sdxl, merge_dtype, save_dtype)
    else:
        merge_loras_to_file(args, sdxl, merge_dtype, save_dtype)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser(sdxl=False).parse_args(argv)
    setup_logging_from_args(args)
    run(args, sdxl=False)


if __name__ == "__main__":
    main()
