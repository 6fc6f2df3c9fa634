#!/usr/bin/env python
"""Extract a FLUX.1 LoRA from two BFL transformer files by truncated SVD (sd-scripts' networks/flux_extract_lora.py).

For every weight of the double and single blocks (upstream's choice: keys with ``double_block`` / ``single_block``,
no biases, no norms), ``ΔW = W_tuned − W_org`` in float32, best rank-r factors (r = min(``--dim``, in, out))
``up = U_r·S_r``, ``down = V_rᵀ``, both clamped at the ``--clamp_quantile`` of their values, ``alpha = r`` (scale
1). A fused layer (``img_attn.qkv``, ``linear1``) is one module, as the BFL file stores it. The file is sd-scripts'
FLUX LoRA format (``lora_unet_double_blocks_0_img_attn_qkv``) with its minimum ``ss_*`` keys, modelspec and
``sshs_*`` hashes of the saved bytes; the models are read one tensor at a time.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.formats.metadata import base_model_version  # noqa: E402
from library.formats.modelspec import build_modelspec  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.models.checkpoint_io import CheckpointReader  # noqa: E402
from library.models.flux_config import bfl_prefix, infer_flux_config, model_name  # noqa: E402
from networks.lora_flux_targets import PREFIX_FLUX, lora_name  # noqa: E402
from networks.lora_svd import svd_factors  # noqa: E402
from networks.lora_tool_io import (check_device, check_inputs_exist, check_lora_output, precision_dtype,  # noqa: E402
                                   save_lora)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """sd-scripts' options (flux_extract_lora.setup_parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of the saved LoRA (default: float); sshs_* hashes describe the saved bytes")
    p.add_argument("--model_org", type=str, default=None, required=True,
                   help="original FLUX.1 transformer, BFL single file (.safetensors)")
    p.add_argument("--model_tuned", type=str, default=None, required=True,
                   help="tuned FLUX.1 transformer; the LoRA is the difference original -> tuned")
    p.add_argument("--mem_eff_safe_open", action="store_true",
                   help="not implemented here (refused): the models are read one tensor at a time with safe_open")
    p.add_argument("--save_to", type=str, default=None, required=True, help="output LoRA (.safetensors)")
    p.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    p.add_argument("--device", type=str, default=None, help="device of the SVD, e.g. cuda (default: cpu)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp both factors to [-q, q], q = this quantile of their values, in (0, 1] (default 0.99)")
    p.add_argument("--no_metadata", action="store_true",
                   help="no modelspec metadata (the minimum ss_* keys are still written)")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it


def is_extracted(key: str, shape: tuple) -> bool:
    """Upstream's filter: block weights, no biases, no norms (all of them 2-D Linear weights)."""
    return (("single_block" in key or "double_block" in key) and ".bias" not in key and "norm" not in key
            and key.endswith(".weight") and len(shape) == 2)


def _open_flux(path: str, option: str) -> tuple[CheckpointReader, str]:
    reader = CheckpointReader(path)
    prefix = bfl_prefix(reader.keys())
    if prefix is None:
        raise UserError(f"{option} {path}: not a FLUX.1 transformer in the BFL layout "
                        "(no double_blocks.0.img_attn.qkv.weight)")
    return reader, prefix


def extracted_keys(org: tuple[CheckpointReader, str], tuned: tuple[CheckpointReader, str]) -> dict[str, str]:
    """``{BFL key without prefix: LoRA module name}`` of the weights to extract; both files must hold them alike."""
    (r_org, p_org), (r_tuned, p_tuned) = org, tuned
    s_org, s_tuned = r_org.shapes(p_org), r_tuned.shapes(p_tuned)
    keys = {}
    for key, shape in s_org.items():
        if not is_extracted(key, shape):
            continue
        if key not in s_tuned:
            raise UserError(f"--model_tuned {r_tuned.path}: has no {key} (--model_org {r_org.path} has): not the "
                            "same model")
        if s_tuned[key] != shape:
            raise UserError(f"--model_tuned {r_tuned.path}: tensor {key} has shape {s_tuned[key]} but --model_org "
                            f"{r_org.path} has {shape}: not the same model")
        keys[key] = lora_name(PREFIX_FLUX, key[: -len(".weight")])
    if not keys:
        raise UserError(f"--model_org {r_org.path}: no block weight to extract")
    return keys


def check_args(args: argparse.Namespace) -> None:
    if args.mem_eff_safe_open:
        raise UserError("--mem_eff_safe_open is not implemented here (the models are read one tensor at a time "
                        "through safetensors' safe_open); leave it out")
    if args.dim < 1:
        raise UserError(f"--dim {args.dim}: must be at least 1")
    if not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: expected a value in (0, 1]")
    check_device(args.device, "--device")
    check_inputs_exist([args.model_org], "--model_org")
    check_inputs_exist([args.model_tuned], "--model_tuned")
    check_lora_output(args.save_to)


@torch.no_grad()
def extract_state_dict(org: tuple[CheckpointReader, str], tuned: tuple[CheckpointReader, str],
                       keys: dict[str, str], dim: int, clamp_quantile: float,
                       device: str | None) -> dict[str, torch.Tensor]:
    """LoRA tensors of every key: rank min(dim, in, out), alpha = rank."""
    (r_org, p_org), (r_tuned, p_tuned) = org, tuned
    sd: dict[str, torch.Tensor] = {}
    for key, name in tqdm(keys.items(), desc="extracting", smoothing=0):
        diff = r_tuned.get(p_tuned + key, torch.float32) - r_org.get(p_org + key, torch.float32)
        factors = svd_factors(diff, dim, clamp_quantile, device)
        sd[f"{name}.lora_up.weight"] = factors.up
        sd[f"{name}.lora_down.weight"] = factors.down
        sd[f"{name}.alpha"] = torch.tensor(float(factors.rank))
    return sd


def extraction_metadata(args: argparse.Namespace, flux_name: str) -> dict[str, str]:
    """Upstream's minimum keys (``ss_network_args`` ``{}``) plus modelspec ``flux-1-<dev|schnell>/lora``."""
    metadata = {"ss_v2": "False", "ss_base_model_version": base_model_version("flux", False),
                "ss_network_module": "networks.lora_flux", "ss_network_dim": str(args.dim),
                "ss_network_alpha": str(float(args.dim)), "ss_network_args": json.dumps({})}
    if not args.no_metadata:
        metadata.update(build_modelspec(f"flux-{flux_name}", False, "lora", title=Path(args.save_to).stem))
    return metadata


def extract(args: argparse.Namespace) -> None:
    """1. check both headers  2. SVD of each block weight's difference  3. save."""
    check_args(args)
    save_dtype = precision_dtype(args.save_precision, "--save_precision", torch.float32)
    org = _open_flux(args.model_org, "--model_org")
    try:
        tuned = _open_flux(args.model_tuned, "--model_tuned")
        try:
            keys = extracted_keys(org, tuned)
            flux_name = model_name(infer_flux_config(org[0].shapes(org[1]), args.model_org))
            sd = extract_state_dict(org, tuned, keys, args.dim, args.clamp_quantile, args.device)
        finally:
            tuned[0].close()
    finally:
        org[0].close()
    save_lora(sd, args.save_to, save_dtype, extraction_metadata(args, flux_name))
    logger.info("LoRA weights saved to %s (%d modules)", args.save_to, len(keys))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    extract(args)


if __name__ == "__main__":
    main()
