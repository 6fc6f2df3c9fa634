"""train_network.py / sdxl_train_network.py as a recipe of the shared runner (recipe.py): a network plug-in
(LoRA) trained on a frozen model, saved with ``ss_*`` metadata."""
from __future__ import annotations

import argparse
import logging
import time
from typing import Callable, Optional

from library.errors import UserError
from library.formats.metadata import build_training_metadata, metadata_for_save, ss_epoch_value
from library.formats.modelspec import modelspec_from_options, trained_resolution
from library.training.loop.checkpointing import Checkpointer
from library.training.methods.network import NetworkMethod, network_text_encoders
from library.training.objective.diffusion_step import DiffusionObjective
from library.training.runners import accelerate_setup as setup
from library.training.runners.recipe import Recipe, RecipeRun, Training, run_recipe
from library.training.runners.run_common import cache_sdxl_text_outputs_if_asked, optimizer_and_schedule, training_facts
from networks.network_host import NetworkHost, parse_network_args

logger = logging.getLogger(__name__)


class NetworkRecipe(Recipe):
    """train_network.py / sdxl_train_network.py: a network plug-in (LoRA) on a frozen model."""

    tracker = "network_train"
    default_module = "networks.lora"  # --network_module when not given

    def __init__(self, sdxl: bool):
        self.sdxl = sdxl
        self.script = "sdxl_train_network" if sdxl else "train_network"

    def check_options(self, args: argparse.Namespace) -> None:
        if self.sdxl:
            _verify_sdxl(args)
        if args.network_train_unet_only and args.network_train_text_encoder_only:
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")

    def text_encoder_cache(self, run: RecipeRun) -> Optional[Callable]:
        """SDXL --cache_text_encoder_outputs: every caption encoded once (U-Net-only training)."""
        if not self.sdxl:
            return None
        return cache_sdxl_text_outputs_if_asked(run.args, run.group, run.models, run.acc, run.wdtype)

    def prepare(self, run: RecipeRun) -> Training:
        args, acc, models = run.args, run.acc, run.models
        host, te_arg, train_unet, train_te = _apply_network(args, run.settings.options, models, self.default_module)
        network = host.network
        if args.full_fp16 or args.full_bf16:
            network.to(run.wdtype)
        groups = host.param_groups(args.text_encoder_lr, args.unet_lr, args.learning_rate)
        optimizer, lr_sched, plan, opt_name = optimizer_and_schedule(args, run.settings.loop, groups, run.group, acc)
        network, optimizer, lr_sched = acc.prepare(network, optimizer, lr_sched)
        host.prepare_grad_etc(te_arg, models.unet)
        settings = run.settings
        method = self.make_method(run, host, train_unet, train_te)
        method.module = network
        method.save_dtype = setup.save_dtype(args)
        method.save_metadata = self.metadata_fn(run, plan, opt_name)
        ext = "." + (args.save_model_as or "safetensors")
        checkpointer = Checkpointer(settings.saving, acc, lambda p, ev, ep, st: method.save(p, ev, ep, st), ext,
                                    plan.num_epochs, plan.max_train_steps, settings.hub)
        return Training(method, optimizer, lr_sched, plan, checkpointer)

    def make_method(self, run: RecipeRun, host: NetworkHost, train_unet: bool, train_te: bool):
        """The loop's method object: the shared diffusion objective through the U-Net."""
        settings = run.settings
        objective = DiffusionObjective.from_settings(settings.objective, run.models.vae.config.scaling_factor)
        return NetworkMethod(host, run.models, objective, settings.text, run.acc, run.wdtype, train_unet, train_te,
                             scale_weight_norms=settings.method.scale_weight_norms)

    def metadata_fn(self, run: RecipeRun, plan, opt_name: str) -> Callable[[str, int, int], dict]:
        """``(event, epoch, global_step) -> metadata`` of each saved file."""
        return _metadata_fn(run.args, run.settings, run.models, run.group, plan, opt_name, run.acc)


def run(args: argparse.Namespace, sdxl: bool = False) -> Optional[str]:
    """Train a network; returns the path of the final file (None after ``--dry_run``)."""
    return run_recipe(args, NetworkRecipe(sdxl))


def _apply_network(args: argparse.Namespace, options, models, default_module: str = "networks.lora"):
    """Create the network (or from --network_weights' dims), wrap the model's layers, load weights, enable
    checkpointing; returns (host, the text-encoder argument of the plug-in API, trains U-Net, trains TE)."""
    host = NetworkHost(args.network_module or default_module)
    te_arg = network_text_encoders(models)
    net_args = parse_network_args(args.network_args)
    if args.dim_from_weights:
        if not args.network_weights:
            raise UserError("--dim_from_weights needs --network_weights")
        host.create_from_weights(1.0, args.network_weights, models.vae, te_arg, models.unet, network_args=net_args)
    else:
        host.create(1.0, args.network_dim, args.network_alpha, models.vae, te_arg, models.unet,
                    network_dropout=args.network_dropout, network_args=net_args)
    train_unet, train_te = not args.network_train_text_encoder_only, not args.network_train_unet_only
    host.prepare_network(options)  # the plug-in API: the run's options, read-only
    host.apply_to(te_arg, models.unet, train_te, train_unet)
    if train_te and host.has_no_text_encoder_modules():
        # e.g. networks.oft: running the text encoder with gradients would cost time and train nothing
        logger.info("%s has no text-encoder modules: the text encoder is not trained", host.module.__name__)
        train_te = False
    if args.network_weights:
        info = host.load_weights(args.network_weights)
        logger.info("loaded network weights %s: %s", args.network_weights, info)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for te in models.text_encoders:
            te.gradient_checkpointing_enable()
        host.enable_gradient_checkpointing()
        models.unet.train()  # diffusers only checkpoints in training mode
    return host, te_arg, train_unet, train_te


def verify_sdxl_base(args: argparse.Namespace) -> None:
    """The checks every SDXL trainer makes (upstream's ``verify_sdxl_training_args``), spec cli-options §11."""
    if args.v2:
        raise UserError("--v2 cannot be used with SDXL")
    if args.v_parameterization:
        logger.warning("--v_parameterization with SDXL: the base model is not v-prediction")
    if args.clip_skip is not None:
        logger.warning("--clip_skip is ignored for SDXL (fixed layers), but recorded in the metadata")
    if getattr(args, "weighted_captions", False):
        raise UserError("--weighted_captions is not supported for SDXL")


def _verify_sdxl(args: argparse.Namespace) -> None:
    """spec cli-options §11."""
    verify_sdxl_base(args)
    if args.cache_text_encoder_outputs and not args.network_train_unet_only:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only")


def _metadata_fn(args, settings, models, group, plan, opt_name: str, acc, spec_family: Optional[str] = None,
                 extra: Optional[dict] = None):
    """``spec_family``: the modelspec family (default: the model's); ``extra``: keys added to the ``ss_*`` set."""
    facts = training_facts(args, models, group, plan, opt_name, acc)
    base = build_training_metadata(settings.options, facts)
    base.update(extra or {})

    def metadata(event: str, epoch: int, global_step: int) -> dict:
        spec = modelspec_from_options(settings.options, spec_family or models.family, "lora",
                                      timestamp=facts.training_started_at, resolution=trained_resolution(group))
        return metadata_for_save(base, global_step=global_step, epoch=ss_epoch_value(event, epoch, plan.num_epochs),
                                 no_metadata=args.no_metadata, modelspec=spec, finished_at=time.time())

    return metadata
