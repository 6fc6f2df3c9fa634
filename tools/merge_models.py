"""Weighted average of full Stable Diffusion checkpoints, safetensors only (spec utilities §16).

out[k] = sum_i ratio_i * model_i[k], in the --precision dtype, saved in --saving_precision. Keys follow the
first model: a key missing from a later model takes the first model's value for that model's ratio; keys only
in later models are dropped (--show_skipped lists them). With --unet_only the text encoder(s) and VAE are
copied from the first model. Ratios are not normalised. No metadata is written (as sd-scripts).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.models.checkpoint_io import CheckpointReader, save_state_dict  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NOT_UNET = ("first_stage_model", "cond_stage_model", "conditioner.")  # VAE, SD1/2 TE, SDXL TEs


def is_unet_key(key: str) -> bool:
    """U-Net key = neither VAE nor text encoder (spec §16; substring tests, as sd-scripts)."""
    return not any(part in key for part in _NOT_UNET)


def check_inputs(models: list[str], ratios: list[float] | None) -> list[float]:
    """Validate the inputs before anything is loaded; return the ratios (default 1/n each)."""
    if not models:
        raise UserError("--models: give at least one .safetensors file")
    for model in models:
        if not model.lower().endswith(".safetensors"):
            raise UserError(f"--models {model}: not a .safetensors file (only safetensors checkpoints can be merged)")
        if not Path(model).is_file():
            raise UserError(f"--models {model}: no such file")
    if ratios is None:
        return [1.0 / len(models)] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"--ratios: {len(ratios)} values for {len(models)} models; give one ratio per model")
    return list(ratios)


def _merge_key(key: str, readers: list[CheckpointReader], ratios: list[float], dtype: torch.dtype,
               device: str) -> tuple[torch.Tensor, list[int]]:
    """Weighted sum for one key; returns it and the indices of later models that lack the key.

    Summation order is sd-scripts': first model, later models in order, then the first model's value
    times the summed ratios of the models that lack the key.
    """
    first = readers[0].get(key).to(device)
    acc = ratios[0] * first.to(dtype)
    missing: list[int] = []
    missing_ratio = 0.0
    for i in range(1, len(readers)):
        if key not in readers[i]:
            missing.append(i)
            missing_ratio += ratios[i]
            continue
        value = readers[i].get(key).to(device)
        if value.shape != first.shape:
            raise UserError(f"{readers[i].path}: tensor {key!r} has shape {tuple(value.shape)}, but "
                            f"{tuple(first.shape)} in {readers[0].path}; the models have different architectures")
        acc = acc + ratios[i] * value.to(dtype)
    if missing:
        acc = acc + missing_ratio * first.to(dtype)
    return acc, missing


def _log_skipped(readers: list[CheckpointReader], first_keys: set[str], show: bool) -> None:
    """Keys found only in later models are dropped: list them with --show_skipped, else count them."""
    for reader in readers[1:]:
        skipped = [k for k in reader.keys() if k not in first_keys]
        if show:
            for key in skipped:
                logger.info(f"Skip: {key}")
        elif skipped:
            logger.info(f"{len(skipped)} keys of {reader.path} are not in the first model and are dropped "
                        "(--show_skipped lists them)")


def merge_checkpoints(paths: list[str], ratios: list[float], unet_only: bool = False, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, show_skipped: bool = False) -> dict[str, torch.Tensor]:
    """The merged state dict (in ``dtype``), keyed like the first model with SD1 TE keys standardised.

    SD1 files whose text encoder keys lack `text_model.` are read under the standard names
    (CheckpointReader), so models of both layouts average key by key.
    """
    readers = [CheckpointReader(p) for p in paths]
    first_keys = readers[0].keys()
    merged: dict[str, torch.Tensor] = {}
    missing_count = [0] * len(readers)
    for key in tqdm(first_keys, desc="merging", smoothing=0.0):
        value = readers[0].get(key)
        if unet_only and not is_unet_key(key):
            merged[key] = value.to(device).to(dtype) if value.is_floating_point() else value
            continue
        if not value.is_floating_point():
            # integer buffers (e.g. position_ids) are indices, not weights: averaging would turn them to float
            merged[key] = value
            continue
        merged[key], missing = _merge_key(key, readers, ratios, dtype, device)
        for i in missing:
            missing_count[i] += 1
            logger.debug(f"Key {key} not in model {paths[i]}, use first model's value")
    for i, count in enumerate(missing_count):
        if count:
            logger.warning(f"{count} keys are not in {paths[i]}: the first model's values are used for its ratio")
    _log_skipped(readers, set(first_keys), show_skipped)
    for reader in readers:
        reader.close()
    return merged


def output_path(output: str) -> str:
    """`.safetensors` appended when missing (spec §16)."""
    return output if output.endswith(".safetensors") else output + ".safetensors"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=str, required=True, help="models to merge (.safetensors)")
    parser.add_argument("--output", type=str, required=True, help="output file; .safetensors is appended if missing")
    parser.add_argument("--ratios", nargs="+", type=float, default=None,
                        help="one weight per model (default 1/n each); not normalised")
    parser.add_argument("--unet_only", action="store_true",
                        help="average only the U-Net; text encoder(s) and VAE are copied from the first model")
    parser.add_argument("--device", type=str, default="cpu", help="device for the arithmetic, e.g. cpu or cuda")
    parser.add_argument("--precision", type=str, default="float", choices=list(DTYPES),
                        help="dtype of the arithmetic")
    parser.add_argument("--saving_precision", type=str, default="float", choices=list(DTYPES),
                        help="dtype of the saved tensors")
    parser.add_argument("--show_skipped", action="store_true",
                        help="log the keys that only later models have (they are dropped)")
    add_logging_arguments(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    ratios = check_inputs(args.models, args.ratios)
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:  # unknown name, or CUDA not available in this torch build
        raise UserError(f"--device {args.device}: not usable here ({str(e).splitlines()[0]})") from None
    for model, ratio in zip(args.models, ratios):
        logger.info(f"model {model}, ratio = {ratio}")
    merged = merge_checkpoints(args.models, ratios, args.unet_only, args.device, DTYPES[args.precision],
                               args.show_skipped)
    save_dtype = DTYPES[args.saving_precision]
    merged = {k: (v.to(save_dtype) if v.is_floating_point() else v).cpu() for k, v in merged.items()}
    path = output_path(args.output)
    logger.info(f"saving to {path}")
    save_state_dict(merged, path)
    logger.info("done!")


if __name__ == "__main__":
    main()
