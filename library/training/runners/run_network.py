"""train_network.py / sdxl_train_network.py: numbered steps from parsed options to a saved network."""
from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Optional

from library.errors import UserError
from library.training.loop.checkpointing import Checkpointer, resume_state
from library.training.loop.train_loop import LoopHooks, LoopPlan
from library.training.memory.device_memory import park_unused_models
from library.training.methods.network import NetworkMethod
from library.training.objective.diffusion_step import DiffusionObjective
from library.training.optim.lr_schedules import build_lr_scheduler
from library.training.optim.optimizers import build_optimizer
from library.training.runners import accelerate_setup as setup
from library.training.runners import run_lock
from library.training.runners.checks import verify_training_args
from library.training.runners.preflight import preflight
from library.training.runners.run_common import (attach_tokenizers, build_data, cache_latents_if_asked,
                                                 encode_latents_fn, encode_text_fn, load_base_models, make_sample_hook,
                                                 tracker_init, train_and_save, training_facts)
from library.training.runners.run_extras import attach_extras
from networks.network_host import NetworkHost, parse_network_args

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace, sdxl: bool = False) -> Optional[str]:
    """Train a network; returns the path of the final file (None after ``--dry_run``)."""
    script = "sdxl_train_network" if sdxl else "train_network"
    # 1. options and seed (train_network draws a seed when none is given and records it: ss_seed)
    verify_training_args(args, script)
    if sdxl:
        _verify_sdxl(args)
    preflight(args, script)
    run_lock.hold(args)  # one run per output name; --dry_run only checks
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.seed is None:
        args.seed = random.randint(0, 2**32 - 1)
    if getattr(args, "dry_run", False):
        from library.training.runners.dry_run import report

        return report(args, script, sdxl=sdxl)
    from accelerate.utils import set_seed

    set_seed(args.seed)
    # 2. data (scanned before any model loads), accelerator, models
    group, params = build_data(args, script, sdxl)
    acc = setup.make_accelerator(args)
    wdtype = setup.weight_dtype(args)
    models = load_base_models(args, acc, wdtype, sdxl=sdxl)
    attach_tokenizers(args, group, models)
    cache_latents_if_asked(args, group, models, acc)
    if sdxl and args.cache_text_encoder_outputs:
        from library.data.te_cache import cache_text_encoder_outputs

        cache_text_encoder_outputs(group, encode_text_fn(models, acc, args, wdtype),
                                   args.cache_text_encoder_outputs_to_disk, acc.is_main_process)
        acc.wait_for_everyone()
    # 3. network
    host = NetworkHost(args.network_module or "networks.lora")
    te_arg = models.text_encoders if models.is_sdxl else models.text_encoders[0]
    net_args = parse_network_args(args.network_args)
    if args.dim_from_weights:
        if not args.network_weights:
            raise UserError("--dim_from_weights needs --network_weights")
        host.create_from_weights(1.0, args.network_weights, models.vae, te_arg, models.unet, network_args=net_args)
    else:
        host.create(1.0, args.network_dim, args.network_alpha, models.vae, te_arg, models.unet,
                    network_dropout=args.network_dropout, network_args=net_args)
    train_unet, train_te = not args.network_train_text_encoder_only, not args.network_train_unet_only
    host.prepare_network(args)
    host.apply_to(te_arg, models.unet, train_te, train_unet)
    if args.network_weights:
        info = host.load_weights(args.network_weights)
        logger.info("loaded network weights %s: %s", args.network_weights, info)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for te in models.text_encoders:
            te.gradient_checkpointing_enable()
        host.enable_gradient_checkpointing()
        models.unet.train()  # diffusers only checkpoints in training mode
    network = host.network
    if args.full_fp16 or args.full_bf16:
        network.to(wdtype)
    # 4. optimizer, scheduler, prepare
    groups = host.param_groups(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    optimizer, opt_name, extra = build_optimizer(groups, args.optimizer_type, args.learning_rate, args.optimizer_args,
                                                 args.use_8bit_adam, args.use_lion_optimizer)
    plan = LoopPlan.from_args(args, _batches_per_process(group, acc))
    args.max_train_steps = plan.max_train_steps
    group.set_max_train_steps(plan.max_train_steps)
    lr_sched = build_lr_scheduler(optimizer, extra.get("lr_scheduler") or args.lr_scheduler, args.lr_warmup_steps,
                                  plan.max_train_steps, args.lr_scheduler_num_cycles, args.lr_scheduler_power,
                                  args.lr_scheduler_type, args.lr_scheduler_args, acc.num_processes)
    network, optimizer, lr_sched = acc.prepare(network, optimizer, lr_sched)
    host.prepare_grad_etc(te_arg, models.unet)
    # 5. method, saving, sampling, resume
    objective = DiffusionObjective.from_args(args, "N", models.vae.config.scaling_factor)
    method = NetworkMethod(host, models, objective, args, acc, wdtype, train_unet, train_te)
    method.module = network
    method.save_dtype = setup.save_dtype(args)
    method.save_metadata = _metadata_fn(args, models, group, plan, opt_name, acc)
    ext = "." + (args.save_model_as or "safetensors")
    checkpointer = Checkpointer(args, acc, lambda p, ev, ep, st: method.save(p, ev, ep, st), ext, plan.num_epochs)
    state = resume_state(acc, args)
    tracker_init(acc, args, "network_train")
    hooks = LoopHooks(sample=make_sample_hook(args, models, acc, wdtype))
    encode_text = encode_text_fn(models, acc, args, wdtype) if sdxl and args.cache_text_encoder_outputs else None
    hooks = attach_extras(args, acc, script, models, group, method, checkpointer, hooks,
                          encode_latents_fn(models, acc, args), encode_text)
    # after all caching (training and validation): the VAE / text encoders leave the device
    hooks.sample = park_unused_models(args, models, acc, hooks.sample, text_encoders_cached=encode_text is not None)
    # 6. train, final save
    return train_and_save(acc, method, group, args, optimizer, lr_sched, plan, checkpointer, state, hooks)


def _verify_sdxl(args: argparse.Namespace) -> None:
    """spec cli-options §11."""
    if args.v2:
        raise UserError("--v2 cannot be used with SDXL")
    if args.v_parameterization:
        logger.warning("--v_parameterization with SDXL: the base model is not v-prediction")
    if args.clip_skip is not None:
        logger.warning("--clip_skip is ignored for SDXL (fixed layers), but recorded in the metadata")
    if getattr(args, "weighted_captions", False):
        raise UserError("--weighted_captions is not supported for SDXL")
    if args.cache_text_encoder_outputs_to_disk and not args.cache_text_encoder_outputs:
        logger.info("--cache_text_encoder_outputs_to_disk implies --cache_text_encoder_outputs")
        args.cache_text_encoder_outputs = True
    if args.cache_text_encoder_outputs and not args.network_train_unet_only:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only")


def _batches_per_process(group, acc) -> int:
    return -(-len(group) // acc.num_processes)


def _metadata_fn(args, models, group, plan, opt_name: str, acc):
    from library.formats.metadata import build_training_metadata, metadata_for_save, ss_epoch_value
    from library.formats.modelspec import modelspec_from_args, trained_resolution

    facts = training_facts(args, models, group, plan, opt_name, acc)
    base = build_training_metadata(args, facts)

    def metadata(event: str, epoch: int, global_step: int) -> dict:
        spec = modelspec_from_args(args, models.family, "lora", timestamp=facts.training_started_at,
                                   resolution=trained_resolution(group))
        return metadata_for_save(base, global_step=global_step, epoch=ss_epoch_value(event, epoch, plan.num_epochs),
                                 no_metadata=args.no_metadata, modelspec=spec, finished_at=time.time())

    return metadata
