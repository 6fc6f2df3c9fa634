"""Steps every trainer shares: base models, data, latent encoding, data loaders, sampling, trackers."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Iterable, Optional

import toml
import torch

from library.config.dataset_blueprint import dataset_params_from_args
from library.config.dataset_schema import parse_resolution
from library.config.option_record import OptionRecord
from library.data.batch import get_input_ids
from library.data.custom_dataset import CustomDatasetGroup, build_custom_group
from library.data.dataset import build_dataset_group, make_dataloader, scan_mode
from library.data.latent_cache import cache_latents
from library.data.te_cache import cache_text_encoder_outputs
from library.errors import UserError
from library.formats.metadata import DatasetFacts, SubsetFacts, TrainingFacts
from library.models.bundle import SDModels
from library.models.loading import load_models
from library.models.small_map_conv import use_matrix_convs
from library.sampling.prompt_file import load_sample_prompts
from library.sampling.training_samples import sample_images_for_training
from library.training.loop.train_loop import train
from library.training.memory.fp8_storage import store_in_fp8
from library.training.objective import conditioning
from library.training.optim.lr_schedules import build_lr_scheduler
from library.training.optim.optimizers import build_optimizer
from library.training.runners import accelerate_setup as setup
from library.training.settings import LoopSettings, loop_plan
from networks.network_host import NetworkHost

logger = logging.getLogger(__name__)


def load_base_models(args: argparse.Namespace, acc, wdtype: torch.dtype, sdxl: bool,
                     train_unet: bool = False, train_text_encoder: bool = False) -> SDModels:
    """Load, merge --base_weights, freeze what does not train, cast to the training dtype, move to the device."""
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required")
    models = load_models(args.pretrained_model_name_or_path, v2=args.v2, sdxl=sdxl,
                         v_parameterization=args.v_parameterization, vae=args.vae, dtype=torch.float32,
                         tokenizer_cache_dir=args.tokenizer_cache_dir)
    _merge_base_weights(args, models)
    for m, trains in ((models.unet, train_unet), (models.vae, False),
                      *((te, train_text_encoder) for te in models.text_encoders)):
        m.requires_grad_(trains)
        m.eval()
    vae_dtype = torch.float32 if getattr(args, "no_half_vae", False) else wdtype
    models.vae.to(acc.device, vae_dtype)
    if not train_unet:
        models.unet.to(acc.device, wdtype)
    if not train_text_encoder:
        for te in models.text_encoders:
            te.to(acc.device, wdtype)
    setup.set_attention(models.unet, args)
    use_matrix_convs(models.unet)  # CPU: wide layers on small maps as one product (small_map_conv.py)
    if getattr(args, "fp8_base", False):
        store_in_fp8(models.unet, wdtype)  # frozen weights in fp8, computed in the training dtype
    return models


def _merge_base_weights(args: argparse.Namespace, models: SDModels) -> None:
    """--base_weights / --base_weights_multiplier: networks merged into the base model before training."""
    files = getattr(args, "base_weights", None) or []
    mults = list(getattr(args, "base_weights_multiplier", None) or [])
    if len(mults) > len(files):
        raise UserError("--base_weights_multiplier has more values than --base_weights files")

    te_arg = models.text_encoders if models.is_sdxl else models.text_encoders[0]
    for i, path in enumerate(files):
        mult = mults[i] if i < len(mults) else 1.0
        host = NetworkHost("networks.lora")
        host.create_from_weights(mult, path, models.vae, te_arg, models.unet, for_inference=True)
        host.merge_to(te_arg, models.unet, host.weights_sd, torch.float32, "cpu")
        logger.info("merged base weights %s x %s", path, mult)


def build_data(args: argparse.Namespace, script: str, sdxl: bool):
    """Dataset group of the run, built and scanned before any model loads (bad images, captions or dataset
    settings fail first); the tokenizers are attached once the models are loaded (``attach_tokenizers``)."""
    params = dataset_params_from_args(args, script)
    group = build_dataset_group(params, [], seed=args.seed, max_train_steps=args.max_train_steps,
                                max_token_length=args.max_token_length, debug_dataset=args.debug_dataset,
                                scan=scan_mode(bool(getattr(args, "verify_images", False))),
                                te_cache_expected=bool(getattr(args, "cache_text_encoder_outputs", False)),
                                latents_cache_expected=bool(args.cache_latents))
    if sdxl:
        group.verify_bucket_reso_steps(32)
    if len(group) == 0:
        raise UserError("no training images found (check --train_data_dir / --dataset_config)")
    return group, params


def build_custom_data(args: argparse.Namespace, models: SDModels, sdxl: bool) -> CustomDatasetGroup:
    """--dataset_class: the user's dataset, built with the model's tokenizer(s) (checked in ``checks.py``)."""
    resolution = parse_resolution(args.resolution) if args.resolution is not None else None
    group = build_custom_group(args.dataset_class, models.tokenizers, args.max_token_length, resolution,
                               args.debug_dataset)
    if sdxl:
        group.verify_bucket_reso_steps(32)
    logger.info("dataset: %s, %d batches per epoch", args.dataset_class, len(group))
    return group


def latent_factor(models: SDModels) -> int:
    """Pixels per latent cell: 2 ** (VAE levels - 1), as diffusers computes it (8 for every real SD VAE)."""
    return 2 ** (len(models.vae.config.block_out_channels) - 1)


def attach_tokenizers(args: argparse.Namespace, group, models: SDModels) -> None:
    """Give the dataset built before the models their tokenizers (captions are tokenized per item) and the
    VAE's latent factor; ``--debug_dataset`` then shows the first batches and exits."""
    group.tokenizers = list(models.tokenizers)
    group.latent_factor = latent_factor(models)
    if args.debug_dataset:
        _debug_dataset(group)


def _debug_dataset(group) -> None:
    """--debug_dataset: print the first batches and exit without training."""
    group.set_current_epoch(1)
    for i in range(min(len(group), 4)):
        batch = group[i]
        shapes = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        print(f"batch {i}: captions={batch.get('captions')} tensors={shapes}")
    sys.exit(0)


def encode_latents_fn(models: SDModels, acc, args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    """VAE sample (unscaled) of images in [-1, 1], for latent caching (spec dataset-config §10)."""
    gen = torch.Generator(device=acc.device)
    gen.manual_seed(args.seed or 0)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = images.to(acc.device, models.vae.dtype)
            return models.vae.encode(x).latent_dist.sample(generator=gen).float().cpu()

    return encode


def encode_text_fn(models: SDModels, acc, args: argparse.Namespace, wdtype: torch.dtype):
    """SDXL: raw captions -> {hidden_state1, hidden_state2, pool2} for the TE-output cache (spec §10.1)."""
    te1, te2 = models.text_encoders
    tok1, tok2 = models.tokenizers

    def encode(captions: list[str]) -> dict:
        ids1 = torch.stack([get_input_ids(c, tok1, args.max_token_length) for c in captions])
        ids2 = torch.stack([get_input_ids(c, tok2, args.max_token_length) for c in captions])
        with torch.no_grad(), acc.autocast():
            ctx, pool = conditioning.encode_sdxl(te1, te2, ids1, ids2, args.max_token_length)
        d1 = te1.config.hidden_size
        return {"hidden_state1": ctx[..., :d1].float().cpu(), "hidden_state2": ctx[..., d1:].float().cpu(),
                "pool2": pool.float().cpu()}

    return encode


def cache_sdxl_text_outputs_if_asked(args: argparse.Namespace, group, models: SDModels, acc,
                                     wdtype: torch.dtype) -> Optional[Callable]:
    """SDXL --cache_text_encoder_outputs (frozen text encoders only): every caption encoded once, in memory or
    next to the images; returns the encoder used (validation captions are cached with it), or None."""
    if not args.cache_text_encoder_outputs:
        return None

    encode = encode_text_fn(models, acc, args, wdtype)
    cache_text_encoder_outputs(group, encode, args.cache_text_encoder_outputs_to_disk, acc.is_main_process)
    acc.wait_for_everyone()
    return encode


def cache_latents_if_asked(args: argparse.Namespace, group, models: SDModels, acc) -> None:
    """--cache_latents / --cache_latents_to_disk: encode every image once before training."""
    if not args.cache_latents:
        return

    with torch.no_grad():
        cache_latents(group, encode_latents_fn(models, acc, args), args.vae_batch_size, args.cache_latents_to_disk,
                      acc.is_main_process)
    acc.wait_for_everyone()


def optimizer_and_schedule(args: argparse.Namespace, loop: LoopSettings, params, group, acc):
    """Optimizer, step plan and LR scheduler of a run (spec cli-options §4.2, §8): ``(opt, sched, plan, name)``.

    The plan resolves ``--max_train_epochs`` into steps; it is what everything after reads (never the options)."""
    optimizer, opt_name, extra = build_optimizer(params, args.optimizer_type, args.learning_rate, args.optimizer_args,
                                                 args.use_8bit_adam, args.use_lion_optimizer)
    plan = loop_plan(loop, -(-len(group) // acc.num_processes))
    group.set_max_train_steps(plan.max_train_steps)
    group.set_step_plan(plan.batches_per_epoch, plan.grad_accum)
    lr_sched = build_lr_scheduler(optimizer, extra.get("lr_scheduler") or args.lr_scheduler, args.lr_warmup_steps,
                                  plan.max_train_steps, args.lr_scheduler_num_cycles, args.lr_scheduler_power,
                                  args.lr_scheduler_type, args.lr_scheduler_args, acc.num_processes)
    return optimizer, lr_sched, plan, opt_name


def make_loader_factory(group, args: argparse.Namespace, acc) -> Callable[[int, int], Iterable]:
    """``(epoch, skip) -> batches`` for this process, moved to the device."""
    workers = min(args.max_data_loader_n_workers, max(1, (__import__("os").cpu_count() or 1)))

    def loader(epoch: int, skip: int):
        dl = make_dataloader(group, workers, args.persistent_data_loader_workers, epoch=epoch + 1, skip=skip,
                             process_index=acc.process_index, num_processes=acc.num_processes)
        for batch in dl:
            yield {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    return loader


def make_sample_hook(args: argparse.Namespace, models: SDModels, acc, wdtype: torch.dtype,
                     prompt_replacer: Optional[Callable[[str], str]] = None, **control):
    """Sample images during training (spec generation §4), or None when not asked for. ``control``:
    ``control_nets`` / ``lllites`` of the ControlNet trainers (``sample_images_for_training``)."""
    if not args.sample_prompts:
        if args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first:
            raise UserError("--sample_every_n_* / --sample_at_first need --sample_prompts")
        return None

    prompts = load_sample_prompts(args.sample_prompts, args.sample_sampler)

    def sample(epoch: Optional[int], steps: int) -> None:
        mine = prompts[acc.process_index::acc.num_processes]
        sample_images_for_training(models, mine, output_dir=args.output_dir or ".", output_name=args.output_name,
                                   epoch=epoch, steps=steps, default_sampler=args.sample_sampler,
                                   v_parameterization=args.v_parameterization, clip_skip=args.clip_skip,
                                   device=acc.device, dtype=wdtype, ti_replacer=prompt_replacer, **control)

    return sample


def tracker_init(acc, options: OptionRecord, default_name: str) -> None:
    if not acc.is_main_process or not acc.log_with:
        return

    init_kwargs = {}
    if options.get("wandb_run_name"):
        init_kwargs["wandb"] = {"name": options["wandb_run_name"]}
    if options.get("log_tracker_config"):
        init_kwargs = toml.load(options["log_tracker_config"])
    config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in options.items()
              if k not in ("wandb_api_key", "huggingface_token")}
    acc.init_trackers(options.get("log_tracker_name") or default_name, config=config, init_kwargs=init_kwargs)


def training_facts(args, models: SDModels, group, plan, opt_name: str, acc):
    return TrainingFacts(family=models.family, num_train_images=group.num_train_images,
                         num_reg_images=group.num_reg_images, num_batches_per_epoch=plan.batches_per_epoch,
                         num_epochs=plan.num_epochs, optimizer_name=opt_name, datasets=dataset_facts(group),
                         v_parameterization=args.v_parameterization, num_processes=acc.num_processes,
                         max_train_steps=plan.max_train_steps)


def dataset_facts(group) -> list:
    """The dataset group as the metadata module describes it (spec file-formats §b.1)."""
    if isinstance(group, CustomDatasetGroup):  # upstream's MinimalDataset: one "dummy" folder
        user = group.user
        subset = SubsetFacts(img_count=int(getattr(user, "img_count", 1)),
                             num_repeats=int(getattr(user, "num_repeats", 1)),
                             image_dir=str(getattr(user, "image_dir", "dummy")))
        return [DatasetFacts(kind="dreambooth", batch_size=group.batch_size, num_train_images=group.num_train_images,
                             num_reg_images=group.num_reg_images, resolution=None,
                             bucket_info=getattr(user, "bucket_info", None) or {}, subsets=[subset])]
    out = []
    for d in group.datasets:
        p = d.params
        plain_buckets = d.bucketed and not d.train_resolution_buckets
        subsets = [SubsetFacts(img_count=n, num_repeats=s.num_repeats, image_dir=s.image_dir,
                               metadata_file=s.metadata_file, class_tokens=s.class_tokens, is_reg=s.is_reg,
                               color_aug=s.color_aug, flip_aug=s.flip_aug, random_crop=s.random_crop,
                               shuffle_caption=s.shuffle_caption, keep_tokens=s.keep_tokens,
                               keep_tokens_separator=s.keep_tokens_separator,
                               secondary_separator=s.secondary_separator, enable_wildcard=s.enable_wildcard,
                               caption_prefix=s.caption_prefix, caption_suffix=s.caption_suffix)
                   for s, n in zip(d.subsets, d.img_counts)]
        out.append(DatasetFacts(kind=d.style, batch_size=p.batch_size, num_train_images=d.num_train_images,
                                num_reg_images=d.num_reg_images, resolution=p.resolution,
                                enable_bucket=bool(d.bucketed), bucket_no_upscale=bool(p.bucket_no_upscale),
                                min_bucket_reso=p.min_bucket_reso if plain_buckets else None,
                                max_bucket_reso=p.max_bucket_reso if plain_buckets else None,
                                tag_frequency=d.tag_frequency, bucket_info=d.bucket_info(), subsets=subsets))
    return out


def train_and_save(acc, training, group, args: argparse.Namespace, loop: LoopSettings, state, hooks,
                   note: str = "") -> str:
    """The last step of every runner: the shared loop, then the final save; returns the final file.
    ``training``: the recipe's ``Training`` (method, optimizer, schedule, plan, checkpointer)."""
    method, optimizer, lr_sched = training.method, training.optimizer, training.lr_scheduler
    plan, checkpointer = training.plan, training.checkpointer
    logger.info("training: %d steps, %d epochs, %d batches per epoch%s", plan.max_train_steps, plan.num_epochs,
                plan.batches_per_epoch, note)
    try:
        state = train(acc, method, make_loader_factory(group, args, acc), group.set_current_epoch, optimizer,
                      lr_sched, plan, checkpointer, loop, state, hooks)
        path = checkpointer.at_end(state)
    finally:
        checkpointer.finish()  # pending hub uploads complete (or fail, logged) before the run returns
    acc.end_training()
    return path
