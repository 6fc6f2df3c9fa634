#!/usr/bin/env python
"""Merge FLUX.1 LoRA files into the BFL transformer file (and CLIP-L / T5-XXL files), or into one LoRA.

sd-scripts' networks/flux_merge_lora.py, its option names and behaviour. With ``--flux_model`` (and / or
``--clip_l`` / ``--t5xxl``) every LoRA module adds ``ratio·(alpha/rank)·up@down`` to the weight of the file key it
names: ``lora_unet_double_blocks_0_img_attn_qkv`` -> ``double_blocks.0.img_attn.qkv.weight`` of ``--flux_model``
(a fused layer is one weight there), ``lora_te1_…`` -> ``--clip_l``, ``lora_te3_…`` -> ``--t5xxl``. Every other
tensor is copied; all are written in ``--save_precision`` (default: ``--precision``, as upstream). Files in
diffusers' FLUX LoRA format (``transformer.…lora_A.weight``) are converted exactly with the model's widths
(``networks/lora_flux_convert.py``). Without a model file the LoRAs become one LoRA (sd-scripts' factor sums,
``--concat``, ``--shuffle``). Inputs are checked from headers before any tensor is merged; outputs are written
through a temporary name.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.formats.lora_io import load_state_dict_file  # noqa: E402
from library.formats.metadata import base_model_version, build_minimum_network_metadata  # noqa: E402
from library.formats.modelspec import build_modelspec  # noqa: E402
from library.formats.tensor_file import TensorFile  # noqa: E402
from library.formats.tensor_file import read_tensor_file  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.models.architectures import infer_text_config  # noqa: E402
from library.models.checkpoint_io import SAFETENSORS_SUFFIXES, CheckpointReader, save_state_dict  # noqa: E402
from library.models.flux_config import bfl_prefix, infer_flux_config, model_name  # noqa: E402
from library.models.flux_preflight import check_flux_parts  # noqa: E402
from networks.lora_family import FAMILY_NAMES, FLUX, SDXL, _check_widths_agree, family_of  # noqa: E402
from networks.lora_flux_convert import diffusers_to_kohya, is_diffusers_format, layer_paths  # noqa: E402
from networks.lora_flux_targets import PREFIX_CLIP, PREFIX_FLUX, PREFIX_T5, all_targets, lora_name  # noqa: E402
from networks.lora_svd import module_delta  # noqa: E402
from networks.lora_tool_io import (check_device, check_inputs_exist, check_lora_output, complete_modules,  # noqa: E402
                                   merged_from, module_alpha, save_lora)
from networks.merge_lora import merge_lora_files  # noqa: E402

logger = logging.getLogger(__name__)

# upstream's library.utils.str_to_dtype names
DTYPES = {"float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp8": torch.float8_e4m3fn, "float8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn,
          "e4m3fn": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
          "fp8_e4m3fnuz": torch.float8_e4m3fnuz, "e4m3fnuz": torch.float8_e4m3fnuz,
          "float8_e4m3fnuz": torch.float8_e4m3fnuz, "fp8_e5m2": torch.float8_e5m2, "e5m2": torch.float8_e5m2,
          "float8_e5m2": torch.float8_e5m2, "fp8_e5m2fnuz": torch.float8_e5m2fnuz,
          "e5m2fnuz": torch.float8_e5m2fnuz, "float8_e5m2fnuz": torch.float8_e5m2fnuz}
MERGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_parser() -> argparse.ArgumentParser:
    """sd-scripts' options (flux_merge_lora.setup_parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_precision", type=str, default=None,
                   help="dtype of every saved tensor (default: --precision): float32, fp16, bf16, fp8 (= fp8_e4m3fn), "
                        "fp8_e4m3fn, fp8_e4m3fnuz, fp8_e5m2, fp8_e5m2fnuz")
    p.add_argument("--precision", type=str, default="float",
                   help="dtype of the merge arithmetic: float (default, recommended), fp16, bf16")
    p.add_argument("--flux_model", type=str, default=None,
                   help="FLUX.1 transformer, BFL single file; if omitted (and no --clip_l / --t5xxl), the LoRAs are "
                        "merged into one LoRA")
    p.add_argument("--clip_l", type=str, default=None, help="CLIP-L file to merge the lora_te1_ modules into")
    p.add_argument("--t5xxl", type=str, default=None, help="T5-XXL file to merge the lora_te3_ modules into")
    p.add_argument("--mem_eff_load_save", action="store_true",
                   help="not implemented here (refused): the model is read one tensor at a time anyway")
    p.add_argument("--loading_device", type=str, default="cpu",
                   help="device the model's tensors are held on (default cpu); LoRAs are read on the CPU")
    p.add_argument("--working_device", type=str, default="cpu", help="device of the merge arithmetic (default cpu)")
    p.add_argument("--save_to", type=str, default=None,
                   help="output: the merged FLUX.1 model with --flux_model, else the merged LoRA (.safetensors)")
    p.add_argument("--clip_l_save_to", type=str, default=None, help="output of the merged --clip_l")
    p.add_argument("--t5xxl_save_to", type=str, default=None, help="output of the merged --t5xxl")
    p.add_argument("--models", type=str, nargs="*", help="LoRA files to merge (.safetensors / .ckpt / .pt)")
    p.add_argument("--ratios", type=float, nargs="*", help="one ratio per LoRA file")
    p.add_argument("--no_metadata", action="store_true",
                   help="no modelspec metadata (a merged LoRA still gets the minimum ss_* keys)")
    p.add_argument("--concat", action="store_true",
                   help="LoRA+LoRA: concatenate the ranks instead of summing the factors")
    p.add_argument("--shuffle", action="store_true", help="LoRA+LoRA: randomly permute each module's rank axis")
    p.add_argument("--diffusers", action="store_true",
                   help="the LoRAs are in diffusers' format (files are recognised either way); transformer only")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it


# ------------------------------------------------------------------------------ the model files

@dataclass
class ModelFile:
    """One file to merge into: which option named it, where it goes, and its LoRA module names -> keys."""

    option: str
    path: str
    save_to: str
    names: dict[str, str] = field(default_factory=dict)  # lora module name -> tensor key
    shapes: dict[str, tuple] = field(default_factory=dict)  # tensor key -> shape


def _read_model_file(option: str, path: str, save_to: str | None, save_option: str) -> ModelFile:
    """Header of a model file: it must be the part its option says; its 2-D ``.weight`` keys get LoRA names."""
    if not save_to:
        raise UserError(f"{option} {path}: give {save_option} (where the merged file goes)")
    if not save_to.lower().endswith(SAFETENSORS_SUFFIXES) or os.path.isdir(save_to):
        raise UserError(f"{save_option} {save_to}: the merged file is written as safetensors: name a .safetensors "
                        "or .sft file")
    if os.path.isdir(path):
        raise UserError(f"{option} {path}: is a folder; this tool merges into single files (BFL / sd-scripts layout)")
    reader = CheckpointReader(path)
    keys = reader.keys()
    if option == "--flux_model":
        strip, prefix = bfl_prefix(keys), PREFIX_FLUX
        if strip is None:
            raise UserError(f"--flux_model {path}: not a FLUX.1 transformer in the BFL layout "
                            "(no double_blocks.0.img_attn.qkv.weight)")
    elif option == "--clip_l":
        strip, prefix = "", PREFIX_CLIP
        if "text_model.embeddings.token_embedding.weight" not in reader:
            raise UserError(f"--clip_l {path}: not a CLIP text encoder in the transformers layout (text_model.*)")
    else:
        strip, prefix = "", PREFIX_T5
        if "shared.weight" not in reader and "encoder.block.0.layer.0.SelfAttention.q.weight" not in reader:
            raise UserError(f"--t5xxl {path}: not a T5 encoder in the transformers layout (encoder.block.*)")
    model = ModelFile(option, path, save_to, shapes={k: reader.shape(k) for k in keys})
    for key, shape in model.shapes.items():
        if key.startswith(strip) and key.endswith(".weight") and len(shape) == 2:
            model.names[lora_name(prefix, key[len(strip): -len(".weight")])] = key
    reader.close()
    return model


def model_files(args: argparse.Namespace) -> list[ModelFile]:
    """The files to merge into, checked (part type, widths fit the transformer) from headers only."""
    given = [("--flux_model", args.flux_model, args.save_to, "--save_to"),
             ("--clip_l", args.clip_l, args.clip_l_save_to, "--clip_l_save_to"),
             ("--t5xxl", args.t5xxl, args.t5xxl_save_to, "--t5xxl_save_to")]
    for option, path, _, _ in given:
        if path and not os.path.exists(path):
            raise UserError(f"{option}: no such file: {path}")
    if args.save_to and not args.flux_model:
        raise UserError(f"--save_to {args.save_to}: no --flux_model to merge into (CLIP-L and T5-XXL go to "
                        "--clip_l_save_to / --t5xxl_save_to)")
    files = [_read_model_file(option, path, save_to, save_option)
             for option, path, save_to, save_option in given if path]
    if args.flux_model and (args.clip_l or args.t5xxl):
        check_flux_parts(args.flux_model, {k: v for k, v in (("clip_l", args.clip_l), ("t5xxl", args.t5xxl)) if v})
    outputs = [f.save_to for f in files]
    if len(set(map(os.path.abspath, outputs))) != len(outputs):
        raise UserError(f"the outputs must be different files: {', '.join(outputs)}")
    return files


# ------------------------------------------------------------------------------ the LoRA files

def check_flux_lora(tf: TensorFile) -> None:
    """A FLUX.1 LoRA (sd-scripts' or diffusers' names); a CLIP-L-only file (``lora_te1_`` only) reads as SDXL's
    first text encoder, which is the same model, so it passes."""
    family = family_of(tf, "--models")
    if family == FLUX or (family == SDXL and all(n.startswith(PREFIX_CLIP + "_") for n in tf.modules())):
        return
    raise UserError(f"--models {tf.path} is an {FAMILY_NAMES[family]} LoRA but this tool merges FLUX.1 LoRAs "
                    "(use merge_lora.py / sdxl_merge_lora.py)")


def _meta_models(files: list[ModelFile]):
    """[CLIP-L, None] and the transformer built on the meta device from the files' headers (for the widths a
    diffusers-format LoRA is converted with); None where that file is not given."""
    from diffusers import FluxTransformer2DModel  # start-up (diffusers: ~2 s)
    from transformers import CLIPTextConfig, CLIPTextModel  # start-up (transformers: ~1 s)

    by_option = {f.option: f for f in files}
    transformer = clip = None
    with torch.device("meta"):
        if "--flux_model" in by_option:
            f = by_option["--flux_model"]
            strip = bfl_prefix(f.shapes)
            shapes = {k[len(strip):]: v for k, v in f.shapes.items() if k.startswith(strip)}
            transformer = FluxTransformer2DModel(**infer_flux_config(shapes, f.path))
        if "--clip_l" in by_option:
            clip = CLIPTextModel(CLIPTextConfig(**infer_text_config(by_option["--clip_l"].shapes, "hf", "sd1")))
    return [clip, None], transformer


def read_loras(paths: list[str], files: list[ModelFile]) -> list[dict[str, torch.Tensor]]:
    """Each LoRA as sd-scripts' FLUX state dict (diffusers' format converted with the models' widths)."""
    loaded = []
    meta = None
    for path in paths:
        sd = load_state_dict_file(path)
        if is_diffusers_format(sd):
            if not any(f.option == "--flux_model" for f in files):
                raise UserError(f"--models {path}: a LoRA in diffusers' format needs --flux_model (its fused layers "
                                "are converted with the model's widths)")
            meta = meta or _meta_models(files)
            encoders, transformer = meta
            sd = diffusers_to_kohya(sd, all_targets(encoders, transformer), layer_paths(encoders, transformer),
                                    f"--models {path}")
        loaded.append(sd)
    return loaded


def _part_of(name: str) -> str:
    for prefix, option in ((PREFIX_FLUX, "--flux_model"), (PREFIX_CLIP, "--clip_l"), (PREFIX_T5, "--t5xxl")):
        if name.startswith(prefix + "_"):
            return option
    return "?"


def check_fits(path: str, sd: dict[str, torch.Tensor], files: list[ModelFile]) -> int:
    """Every module of a given part names a 2-D weight of that file with the widths of its factors; modules of
    parts not given are skipped with a warning (as upstream). Returns how many modules will merge."""
    by_option = {f.option: f for f in files}
    matched, skipped = 0, {}
    for name, parts in complete_modules(sd, path).items():
        option = _part_of(name)
        if option == "?":
            raise UserError(f"--models {path}: module {name} is not a FLUX.1 LoRA module (lora_unet_ / lora_te1_ / "
                            "lora_te3_)")
        model = by_option.get(option)
        if model is None:
            skipped.setdefault(option, []).append(name)
            continue
        key = model.names.get(name)
        if key is None:
            raise UserError(f"--models {path}: module {name} names no layer of {option} {model.path}: a LoRA for a "
                            "model of another layout")
        down, up = tuple(parts["lora_down.weight"].shape), tuple(parts["lora_up.weight"].shape)
        weight = model.shapes[key]
        if len(down) != 2 or len(up) != 2 or down[1] != weight[1] or up[0] != weight[0] or up[1] != down[0]:
            raise UserError(f"--models {path}: module {name}: lora_down {down} / lora_up {up} do not fit {key} "
                            f"{weight} of {model.path}: a LoRA for a model of other widths")
        matched += 1
    for option, names in skipped.items():
        logger.warning("%s: %d modules (%s, ...) are not merged: no %s given", path, len(names), names[0], option)
    return matched


# ------------------------------------------------------------------------------ into the model files

@torch.no_grad()
def merge_into_file(model: ModelFile, loras: list[dict[str, torch.Tensor]], ratios: list[float],
                    merge_dtype: torch.dtype, loading_device: str, working_device: str) -> dict[str, torch.Tensor]:
    """The file's tensors with ``W + Σ ratio·(alpha/rank)·up@down`` on every weight a LoRA names (merge dtype)."""
    reader = CheckpointReader(model.path)
    state = {key: reader.get(key).to(loading_device) for key in reader.keys()}
    reader.close()
    merged: dict[str, torch.Tensor] = {}
    for sd, ratio in zip(loras, ratios):
        for name, parts in complete_modules(sd, model.path).items():
            key = model.names.get(name) if _part_of(name) == model.option else None
            if key is None:
                continue
            delta = module_delta(parts["lora_up.weight"], parts["lora_down.weight"], module_alpha(parts)) * ratio
            weight = merged.get(key, state[key]).to(working_device, merge_dtype)
            merged[key] = (weight + delta.to(working_device, merge_dtype)).to(loading_device)
    logger.info("%s: merged %d weights", model.path, len(merged))
    state.update(merged)
    return state


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to("cpu", dtype) if v.is_floating_point() else v.to("cpu")) for k, v in state.items()}


def model_metadata(args: argparse.Namespace, model: ModelFile) -> dict[str, str] | None:
    """modelspec of a merged FLUX.1 transformer (upstream: none for CLIP-L / T5-XXL, none with --no_metadata)."""
    if args.no_metadata or model.option != "--flux_model":
        return None
    strip = bfl_prefix(model.shapes)
    name = model_name(infer_flux_config({k[len(strip):]: v for k, v in model.shapes.items()}, model.path))
    return build_modelspec(f"flux-{name}", False, "checkpoint", title=Path(model.save_to).stem,
                           merged_from=merged_from([model.path] + list(args.models)))


def merge_into_models(args: argparse.Namespace, merge_dtype: torch.dtype, save_dtype: torch.dtype) -> None:
    """Check the files and every module against them, then merge and write each model file."""
    if args.concat or args.shuffle:
        raise UserError("--concat / --shuffle apply to LoRA+LoRA merges only (without --flux_model / --clip_l / "
                        "--t5xxl)")
    if args.diffusers and (args.clip_l or args.t5xxl):
        raise UserError("--diffusers: --clip_l / --t5xxl are not merged with diffusers-format LoRAs (as upstream)")
    files = model_files(args)
    loras = read_loras(args.models, files)
    if sum(check_fits(path, sd, files) for path, sd in zip(args.models, loras)) == 0:
        raise UserError(f"--models: no module of {', '.join(args.models)} names a layer of the given files: "
                        "nothing would be merged")
    for model in files:
        state = merge_into_file(model, loras, args.ratios, merge_dtype, args.loading_device, args.working_device)
        save_state_dict(_cast(state, save_dtype), model.save_to, metadata=model_metadata(args, model))
        logger.info("saved %s merged into %s", model.option, model.save_to)


# ------------------------------------------------------------------------------ LoRA + LoRA

def _lora_family_name(paths: list[str]) -> str:
    """dev or schnell from the inputs' modelspec (sd-scripts always says dev)."""
    for path in paths:
        arch = read_tensor_file(path, "--models").metadata.get("modelspec.architecture", "")
        if arch.startswith("flux-1-schnell"):
            return "schnell"
    return "dev"


def merge_loras_to_file(args: argparse.Namespace, merge_dtype: torch.dtype, save_dtype: torch.dtype) -> None:
    """sd-scripts' LoRA+LoRA merge (networks/merge_lora.py's, same scaling), FLUX.1 metadata."""
    check_lora_output(args.save_to)
    for option in ("clip_l_save_to", "t5xxl_save_to"):
        if getattr(args, option):
            raise UserError(f"--{option} needs --{option[: -len('_save_to')]} (the file to merge into)")
    for path in args.models:
        if is_diffusers_format(read_tensor_file(path, "--models").shapes):  # key names only
            raise UserError(f"--models {path}: a LoRA in diffusers' format is merged into a model only (its fused "
                            "layers need the model's widths): give --flux_model")
    merged = merge_lora_files(args.models, args.ratios, merge_dtype, args.concat, args.shuffle)
    metadata = build_minimum_network_metadata("False", merged.base_model_version or base_model_version("flux", False),
                                              "networks.lora_flux", merged.dim, merged.alpha, None)
    if not args.no_metadata:
        metadata.update(build_modelspec(f"flux-{_lora_family_name(args.models)}", False, "lora",
                                        title=Path(args.save_to).stem, merged_from=merged_from(args.models)))
    save_lora(merged.state_dict, args.save_to, save_dtype, metadata)
    logger.info("saved merged LoRA %s", args.save_to)


# ------------------------------------------------------------------------------ entry

def _dtype(name: str | None, option: str, default: torch.dtype | None = None) -> torch.dtype:
    if name is None or name == "None":
        return default
    if name not in DTYPES:
        raise UserError(f"{option} {name!r}: expected one of float, fp16, bf16, fp8, fp8_e4m3fn, fp8_e4m3fnuz, "
                        "fp8_e5m2, fp8_e5m2fnuz")
    return DTYPES[name]


def check_args(args: argparse.Namespace) -> tuple[torch.dtype, torch.dtype]:
    """Options and LoRA inputs before any merging; returns (merge dtype, save dtype)."""
    if args.mem_eff_load_save:
        raise UserError("--mem_eff_load_save is not implemented here (the model is read one tensor at a time; the "
                        "merged file is written by safetensors from memory); leave it out")
    if not args.models:
        raise UserError("--models: give at least one LoRA file")
    if args.ratios is None or len(args.ratios) != len(args.models):
        raise UserError(f"--ratios: give one ratio per model ({len(args.models)} models, "
                        f"{len(args.ratios or [])} ratios)")
    check_device(args.loading_device, "--loading_device")
    check_device(args.working_device, "--working_device")
    merge_dtype = _dtype(args.precision, "--precision")
    if merge_dtype not in MERGE_DTYPES:
        raise UserError(f"--precision {args.precision}: the merge arithmetic runs in float, fp16 or bf16")
    save_dtype = _dtype(args.save_precision, "--save_precision", merge_dtype)
    check_inputs_exist(args.models, "--models")
    files = [read_tensor_file(path, "--models") for path in args.models]
    for tf in files:
        check_flux_lora(tf)
    _check_widths_agree(files, "--models")
    return merge_dtype, save_dtype


def run(args: argparse.Namespace) -> None:
    merge_dtype, save_dtype = check_args(args)
    if args.flux_model or args.clip_l or args.t5xxl:
        merge_into_models(args, merge_dtype, save_dtype)
    else:
        merge_loras_to_file(args, merge_dtype, save_dtype)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    run(args)


if __name__ == "__main__":
    main()
