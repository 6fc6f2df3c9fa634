"""flux_train_network.py as a recipe of the shared runner: a FLUX.1 LoRA (networks.lora_flux) trained on a
frozen FLUX.1 dev / schnell, saved in sd-scripts' format with its FLUX ``ss_*`` keys and modelspec."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Optional

import torch

from library.config.options_flux import FLUX_SCRIPT
from library.data.latent_cache import cache_latents, npz_shapes
from library.data.te_cache import cache_text_encoder_outputs
from library.data.validation_split import wants_validation
from library.errors import UserError
from library.formats.flux_metadata import flux_training_keys
from library.models.bundle import SDModels
from library.models.flux_bundle import FluxModels
from library.models.flux_loading import load_flux_models
from library.sampling.flux_pipeline import FluxGenerator
from library.sampling.flux_text import encode_flux_prompts, t5_max_length
from library.sampling.flux_training_samples import sample_flux_images_for_training
from library.sampling.prompt_file import load_sample_prompts
from library.training.memory.block_swap import enable_flux_block_swap
from library.training.memory.fp8_storage import store_in_fp8
from library.training.methods.flux_network import FluxNetworkMethod, cached_flux_outputs
from library.training.objective.flow_matching import FlowMatchingConfig
from library.training.runners.dry_run import report
from library.training.runners.flux_checks import FLUX_NETWORK_MODULE, reject_flux_options
from library.training.runners.recipe import RecipeRun, Training, run_recipe
from library.training.runners.run_common import build_data, encode_latents_fn, make_sample_hook
from library.training.runners.run_network import NetworkRecipe, _metadata_fn
from library.training.settings import TrainSettings
from networks.network_host import NetworkHost

logger = logging.getLogger(__name__)

FLUX_LATENT_CHANNELS = 16
FLUX_LATENTS_SUFFIX = "_flux_latents.npz"  # 16 channels: never SD's <image>.npz
FLUX_TE_SUFFIX = "_flux_te_outputs.npz"  # not SDXL's _te_outputs.npz: the two must never be taken for each other


def flow_config(args: argparse.Namespace) -> FlowMatchingConfig:
    """The FLUX.1 objective options of a run."""
    return FlowMatchingConfig(
        timestep_sampling=args.timestep_sampling, sigmoid_scale=args.sigmoid_scale,
        discrete_flow_shift=args.discrete_flow_shift, weighting_scheme=args.weighting_scheme,
        logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
        model_prediction_type=args.model_prediction_type, guidance_scale=float(args.guidance_scale),
        ip_noise_gamma=args.ip_noise_gamma, ip_noise_gamma_random_strength=bool(args.ip_noise_gamma_random_strength))


def training_view(flux: FluxModels) -> SDModels:
    """The shared runner's view of FLUX.1: the transformer where the U-Net goes, the AE as VAE, [CLIP-L, T5-XXL]
    as text encoders; the dataset tokenizes captions with CLIP-L only (the method tokenizes T5 itself)."""
    return SDModels(family="flux", unet=flux.transformer, vae=flux.ae, text_encoders=[flux.clip_l, flux.t5xxl],
                    tokenizers=[flux.tokenizers[0]], source=flux.source)


def check_prepared_latents(group) -> None:
    """Latent files a fine-tuning metadata set names (prepare_buckets_latents.py) must be the FLUX.1 AE's 16
    channels: an SD VAE's 4-channel latents are one line now, not a shape error in the transformer."""
    for dataset in group.datasets:
        for info in dataset.images:
            if info.latents_npz is not None:
                channels = npz_shapes(info.latents_npz).get("latents", (None,))[0]
                if channels != FLUX_LATENT_CHANNELS:
                    raise UserError(f"{info.latents_npz}: latents of {channels} channels, FLUX.1's AE makes "
                                    f"{FLUX_LATENT_CHANNELS}: these were cached for another model; delete them or "
                                    "leave them out of the metadata")


def drop_stale_te_files(group, t5_length: int) -> None:
    """Remove ``<image>_flux_te_outputs.npz`` files of another T5 token length (re-encoded, as sd-scripts
    re-caches files that do not fit the run); other files are reused as they are."""
    stale = 0
    for dataset in group.datasets:
        for info in dataset.images:
            path = os.path.splitext(info.path)[0] + FLUX_TE_SUFFIX
            if os.path.exists(path) and npz_shapes(path).get("hidden_state1", (None,))[0] != t5_length:
                os.remove(path)
                stale += 1
    if stale:
        logger.info("%d cached text-encoder files of another T5 token length are encoded again", stale)


def merge_base_weights(files: list, multipliers: list, flux: FluxModels) -> None:
    """--base_weights / --base_weights_multiplier: FLUX.1 LoRAs merged into the loaded (fp32) models first."""
    if len(multipliers) > len(files):
        raise UserError("--base_weights_multiplier has more values than --base_weights files")
    encoders = [flux.clip_l, flux.t5xxl]
    for i, path in enumerate(files):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        host = NetworkHost(FLUX_NETWORK_MODULE)
        host.create_from_weights(multiplier, path, flux.ae, encoders, flux.transformer, for_inference=True)
        host.merge_to(encoders, flux.transformer, host.weights_sd, torch.float32, "cpu")
        logger.info("merged base weights %s x %s", path, multiplier)


class FluxNetworkRecipe(NetworkRecipe):
    """flux_train_network.py: networks.lora_flux on a frozen FLUX.1."""

    default_module = FLUX_NETWORK_MODULE

    def __init__(self):
        super().__init__(sdxl=False)
        self.script = FLUX_SCRIPT
        self.flux: Optional[FluxModels] = None
        self.block_swaps: tuple = ()

    def check_options(self, args: argparse.Namespace) -> None:
        reject_flux_options(args)
        super().check_options(args)
        flow_config(args)  # a bad choice from a config file is one line now

    def build_data(self, args: argparse.Namespace):
        group, params = build_data(args, self.script, sdxl=True)  # bucket steps of 32, as sd-scripts' FLUX trainer
        check_prepared_latents(group)
        to_disk = [o for o in ("cache_latents_to_disk", "cache_text_encoder_outputs_to_disk") if getattr(args, o)]
        if to_disk and any(wants_validation(p.subsets) for p in params):
            # the validation images' caches would be written under SD's / SDXL's file names
            raise UserError(f"validation_split with --{to_disk[0]} is not supported for FLUX.1 training yet "
                            "(the in-memory caches work)")
        return group

    def cache_latents(self, args: argparse.Namespace, group, models: SDModels, acc) -> None:
        """--cache_latents in memory, or --cache_latents_to_disk as ``<image>_flux_latents.npz``."""
        if not args.cache_latents:
            return
        with torch.no_grad():
            cache_latents(group, encode_latents_fn(models, acc, args), args.vae_batch_size,
                          args.cache_latents_to_disk, acc.is_main_process, suffix=FLUX_LATENTS_SUFFIX)
        acc.wait_for_everyone()

    def dry_run(self, args: argparse.Namespace, settings: TrainSettings) -> None:
        return report(args, settings.loop, self.script, sdxl=True, family="flux")

    def load_models(self, args: argparse.Namespace, acc, wdtype: torch.dtype) -> SDModels:
        """Load FLUX.1, freeze it, cast it to the training dtype (the AE to fp32 with --no_half_vae), move it."""
        flux = load_flux_models(str(args.pretrained_model_name_or_path), ae=args.ae, clip_l=args.clip_l,
                                t5xxl=args.t5xxl, dtype=torch.float32, tokenizer_cache_dir=args.tokenizer_cache_dir)
        for _, m in flux.parts():
            m.requires_grad_(False)
            m.eval()
        merge_base_weights(args.base_weights or [], args.base_weights_multiplier or [], flux)
        flux.ae.to(acc.device, torch.float32 if args.no_half_vae else wdtype)
        for m in (flux.clip_l, flux.t5xxl):
            m.to(acc.device, wdtype)
        # with --blocks_to_swap the transformer stays in CPU memory until prepare() places it block by block:
        # the whole of it never has to fit on the device
        if args.blocks_to_swap:
            flux.transformer.to(wdtype)
        else:
            flux.transformer.to(acc.device, wdtype)
        if args.fp8_base or args.fp8_base_unet:
            # the transformer's Linear weights in fp8, computed in the training dtype; upstream's --fp8_base also
            # stores T5-XXL in fp8 (with its own T5 forward patch), here T5-XXL stays in the training dtype
            count = store_in_fp8(flux.transformer, wdtype)
            logger.info("--fp8_base: %d transformer weights stored in float8_e4m3fn (T5-XXL stays %s)", count,
                        str(wdtype).replace("torch.", ""))
        self.flux = flux
        logger.info("FLUX.1 %s loaded; T5-XXL tokens: %d", flux.name, self._t5_length(args))
        return training_view(flux)

    def _t5_length(self, args: argparse.Namespace) -> int:
        return t5_max_length(args.t5xxl_max_token_length, self.flux.name)

    def text_encoder_cache(self, run: RecipeRun) -> Optional[Callable]:
        """--cache_text_encoder_outputs(_to_disk): every raw caption through CLIP-L and T5-XXL once."""
        args = run.args
        if not args.cache_text_encoder_outputs:
            return None
        flux, acc = self.flux, run.acc
        t5_length = self._t5_length(args)

        def encode(captions: list[str]) -> dict:
            with torch.no_grad(), acc.autocast():
                cond = encode_flux_prompts(flux.clip_l, flux.t5xxl, flux.tokenizers, captions, t5_length,
                                           args.apply_t5_attn_mask)
                mask = flux.tokenizers[1](captions, max_length=t5_length, padding="max_length", truncation=True,
                                          return_tensors="pt").attention_mask
            return cached_flux_outputs(cond, mask)

        to_disk = bool(args.cache_text_encoder_outputs_to_disk)
        if to_disk and acc.is_main_process:
            drop_stale_te_files(run.group, t5_length)
        acc.wait_for_everyone()
        cache_text_encoder_outputs(run.group, encode, to_disk, acc.is_main_process,
                                   batch_size=args.text_encoder_batch_size, suffix=FLUX_TE_SUFFIX)
        acc.wait_for_everyone()
        if not args.network_train_unet_only:
            # CLIP-L trains and runs every step (the method takes only T5's outputs from the cache): T5-XXL alone
            # leaves the device; the runner's parking of both encoders is for frozen ones
            flux.t5xxl.to("cpu")
            logger.info("T5-XXL kept in CPU memory while training (outputs cached); CLIP-L trains")
            return None
        return encode

    def sample_hook(self, run: RecipeRun) -> Optional[Callable[[Optional[int], int], None]]:
        """``--sample_prompts``: FLUX.1 images through the training models (LoRA applied), or None."""
        args, acc = run.args, run.acc
        if not args.sample_prompts:
            return make_sample_hook(args, run.models, acc, run.wdtype)  # None, or the error for a lone schedule
        prompts = load_sample_prompts(args.sample_prompts, args.sample_sampler)
        generator = FluxGenerator(self.flux, acc.device, t5_max_length=self._t5_length(args),
                                  apply_t5_attn_mask=args.apply_t5_attn_mask, progress=False)

        def sample(epoch: Optional[int], steps: int) -> None:
            sample_flux_images_for_training(generator, prompts[acc.process_index::acc.num_processes],
                                            output_dir=args.output_dir or ".", output_name=args.output_name,
                                            epoch=epoch, steps=steps)

        return sample

    def prepare(self, run: RecipeRun) -> Training:
        """The network as for SD, then --blocks_to_swap: the transformer's blocks placed on the device or in CPU
        memory (after the network wraps its layers, which reads every layer's shape)."""
        training = super().prepare(run)
        if run.args.blocks_to_swap:
            if run.acc.device.type == "cpu":
                logger.warning("--blocks_to_swap on the CPU saves no memory (the blocks are swapped all the same)")
            self.block_swaps = enable_flux_block_swap(self.flux.transformer, run.args.blocks_to_swap,
                                                      run.acc.device)
        return training

    def make_method(self, run: RecipeRun, host: NetworkHost, train_unet: bool, train_te: bool):
        args, settings = run.args, run.settings
        return FluxNetworkMethod(host, run.models, self.flux.tokenizers, flow_config(args), settings.objective.loss,
                                 settings.text, run.acc, run.wdtype, train_unet, train_te,
                                 t5_max_length=self._t5_length(args), apply_t5_attn_mask=args.apply_t5_attn_mask,
                                 guidance_embeds=not self.flux.is_schnell, noise_cfg=settings.objective.noise,
                                 scale_weight_norms=settings.method.scale_weight_norms)

    def metadata_fn(self, run: RecipeRun, plan, opt_name: str) -> Callable[[str, int, int], dict]:
        """train_network's ``ss_*`` keys with ``ss_base_model_version`` flux1, the FLUX options' keys and the
        modelspec of ``flux-1-dev/lora`` or ``flux-1-schnell/lora`` (sd-scripts' ``update_metadata``)."""
        extra = flux_training_keys(run.settings.options)
        extra["ss_network_module"] = run.args.network_module or FLUX_NETWORK_MODULE
        return _metadata_fn(run.args, run.settings, run.models, run.group, plan, opt_name, run.acc,
                            spec_family=f"flux-{self.flux.name}", extra=extra)


def run(args: argparse.Namespace) -> Optional[str]:
    """Train a FLUX.1 LoRA; returns the path of the final file (None after ``--dry_run``)."""
    return run_recipe(args, FluxNetworkRecipe())
