"""Accelerator, precision and tracker set-up shared by every trainer (spec cli-options §4.2-§4.3, §6)."""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import time

import torch
from accelerate import Accelerator, DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType

from library.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "no": torch.float32, None: None}


def weight_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype frozen weights are cast to: the mixed-precision dtype (sd-scripts)."""
    return DTYPES[getattr(args, "mixed_precision", "no") or "no"]


def save_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return DTYPES[getattr(args, "save_precision", None)]


def logging_dir(args: argparse.Namespace) -> str | None:
    if not getattr(args, "logging_dir", None):
        return None
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    return os.path.join(args.logging_dir, f"{args.log_prefix or ''}{stamp}")


def make_accelerator(args: argparse.Namespace):
    """accelerate.Accelerator configured from sd-scripts' options."""
    _reset_accelerate_state()
    log_with = getattr(args, "log_with", None)
    log_dir = logging_dir(args)
    if log_with is None and log_dir:
        log_with = "tensorboard"
    if log_with in ("tensorboard", "all") and not log_dir:
        raise UserError(f"--log_with {log_with} needs --logging_dir")
    if log_with in ("wandb", "all"):
        try:
            import wandb  # optional package
        except ImportError:
            raise UserError("--log_with wandb needs wandb: pip install wandb") from None
        if getattr(args, "wandb_api_key", None):
            wandb.login(key=args.wandb_api_key)
    handlers = []
    if getattr(args, "ddp_timeout", None):
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    if getattr(args, "ddp_gradient_as_bucket_view", False) or getattr(args, "ddp_static_graph", False):
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                                                      static_graph=args.ddp_static_graph))
    kwargs = {}
    if getattr(args, "deepspeed", False):
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(args)
    if getattr(args, "torch_compile", False):
        kwargs["dynamo_backend"] = args.dynamo_backend
    acc = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                      mixed_precision=args.mixed_precision,
                      log_with=["tensorboard", "wandb"] if log_with == "all" else log_with,
                      project_dir=log_dir, kwargs_handlers=handlers, **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        # accelerate counts no processes for DeepSpeed without GPUs, for one: each would train alone on the same
        # batches and write the same files
        raise UserError(f"{launched} processes were launched but accelerate sees {acc.num_processes} "
                        f"({acc.distributed_type.value}{', DeepSpeed needs GPUs here' if getattr(args, 'deepspeed', False) else ''})")
    if getattr(args, "deepspeed", False) and acc.distributed_type != DistributedType.DEEPSPEED:
        # accelerate drops the plugin without a word (ACCELERATE_USE_CPU=1 / --cpu, for one): never train as if
        raise UserError(f"--deepspeed: accelerate did not enable DeepSpeed (it chose {acc.distributed_type.value}; "
                        "ACCELERATE_USE_CPU / accelerate launch --cpu turn it off)")
    if getattr(args, "full_fp16", False):
        allow_fp16_unscale(acc.scaler)
    return acc


def allow_fp16_unscale(scaler) -> None:
    """``--full_fp16``: the trained weights, so their gradients, are fp16, and torch's grad scaler refuses to
    unscale fp16 gradients ("Attempting to unscale FP16 gradients"). As sd-scripts does, let it: the scaler's
    inf/nan check still skips overflowing steps. No scaler (CPU, bf16): nothing to patch."""
    if scaler is None:
        return
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16


def _reset_accelerate_state() -> None:
    """accelerate keeps its state in process-wide singletons; a second run in the same process (tests,
    notebooks, the demo) with another precision must start from a clean state."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _deepspeed_plugin(args: argparse.Namespace):
    """accelerate's DeepSpeed plugin as sd-scripts configures it (spec cli-options §6)."""
    try:
        import deepspeed  # optional package noqa: F401
    except ImportError:
        raise UserError("--deepspeed needs deepspeed: pip install deepspeed") from None

    plugin = DeepSpeedPlugin(zero_stage=args.zero_stage, gradient_accumulation_steps=args.gradient_accumulation_steps,
                             gradient_clipping=args.max_grad_norm, offload_optimizer_device=args.offload_optimizer_device,
                             offload_optimizer_nvme_path=args.offload_optimizer_nvme_path,
                             offload_param_device=args.offload_param_device,
                             offload_param_nvme_path=args.offload_param_nvme_path, zero3_init_flag=args.zero3_init_flag,
                             zero3_save_16bit_model=args.zero3_save_16bit_model)
    # accelerate writes gradient_clipping only when it is truthy, and fills a missing one with 1.0 at prepare:
    # --max_grad_norm 0 (no clipping, as everywhere else) must reach DeepSpeed as 0.0
    plugin.deepspeed_config["gradient_clipping"] = float(args.max_grad_norm or 0.0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    plugin.deepspeed_config["train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * world
    if args.mixed_precision == "fp16":
        plugin.deepspeed_config.setdefault("fp16", {})["initial_scale_power"] = 0
    if args.fp16_master_weights_and_gradients:
        plugin.deepspeed_config["fp16_master_weights_and_gradients"] = True
    return plugin


def set_attention(unet, args: argparse.Namespace) -> None:
    """SDPA by default (diffusers' AttnProcessor2_0); --xformers only where installed."""
    if getattr(args, "xformers", False):
        try:
            import xformers  # optional package noqa: F401
        except ImportError:
            raise UserError("--xformers needs the xformers package (GPU only): pip install xformers, or use --sdpa") from None
        unet.enable_xformers_memory_efficient_attention()
        return
    # --sdpa and --mem_eff_attn both map to torch's scaled_dot_product_attention, which picks a
    # memory-efficient or flash kernel itself; diffusers uses it by default.
    from diffusers.models.attention_processor import AttnProcessor2_0  # start-up (diffusers: ~2 s)

    unet.set_attn_processor(AttnProcessor2_0())
