"""gen_img set-up: model loading, precision, attention kernels, networks (LoRA) and TI. spec generation §1.1, §8."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from library.errors import UserError
from library.models.bundle import SDModels
from library.models.flux_bundle import FluxModels
from library.models.flux_loading import load_flux_models
from library.models.loading import load_models
from library.models.small_map_conv import use_matrix_convs
from library.sampling.textual_inversion import load_textual_inversion
from networks.lora_family import check_fits_layers, embedding_family, family_of, read_tensor_file
from networks.lora_targets import target_weight_shapes
from networks.network_host import import_network_module, parse_network_args

logger = logging.getLogger(__name__)


def resolve_ckpt(ckpt: str | None) -> str:
    """`--ckpt`: an existing path, or a glob with exactly one match. spec §1.1."""
    if not ckpt:
        raise UserError("--ckpt is required: a .safetensors/.ckpt file or a Diffusers folder")
    if os.path.exists(ckpt):
        return ckpt
    matches = glob.glob(ckpt)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"--ckpt {ckpt}: matches {len(matches)} paths; name exactly one")
    raise UserError(f"--ckpt {ckpt}: no such file or folder")


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def load_gen_models(args: argparse.Namespace, device: torch.device) -> SDModels:
    """Load `--ckpt` (+ `--vae`) with the family flags; models in `--fp16/--bf16`, VAE fp32 with --no_half_vae."""
    path = resolve_ckpt(args.ckpt)
    sdxl = True if args.sdxl else False if (args.v1 or args.v2) else None
    models = load_models(path, v2=args.v2, sdxl=sdxl, v_parameterization=args.v_parameterization, vae=args.vae,
                         tokenizer_cache_dir=args.tokenizer_cache_dir)
    if args.v1 and models.family != "sd1":
        raise UserError(f"--ckpt {path}: --v1 was given but this is an {models.family.upper()} model")
    dtype = model_dtype(args)
    models.to(device=device, dtype=dtype)
    if args.no_half_vae:
        models.vae.to(dtype=torch.float32)
    for m in (models.unet, models.vae, *models.text_encoders):
        m.eval().requires_grad_(False)
    return models


def load_gen_flux_models(args: argparse.Namespace, device: torch.device) -> FluxModels:
    """FLUX.1 `--ckpt` (BFL transformer file or Diffusers folder) with `--ae` / `--clip_l` / `--t5xxl`, in
    `--fp16/--bf16` (the AE in float32 with --no_half_vae); `--vae_slices` decodes in slices and tiles."""
    models = load_flux_models(resolve_ckpt(args.ckpt), ae=args.ae, clip_l=args.clip_l, t5xxl=args.t5xxl,
                              dtype=model_dtype(args), tokenizer_cache_dir=args.tokenizer_cache_dir)
    models.to(device=device)
    if args.no_half_vae:
        models.ae.to(dtype=torch.float32)
    for _, m in models.parts():
        m.eval().requires_grad_(False)
    if args.vae_slices:
        models.ae.enable_slicing()
        models.ae.enable_tiling()
    return models


def set_attention(args: argparse.Namespace, models: SDModels) -> None:
    """`--xformers`/`--diffusers_xformers` (only if importable), `--sdpa` (the default), `--opt_channels_last`,
    `--vae_slices` (diffusers' sliced + tiled VAE decode: memory-saving like upstream's, not bit-identical); on the
    CPU the U-Net's wide convolutions on small maps as one product (``small_map_conv``)."""
    if args.xformers or args.diffusers_xformers:
        if importlib.util.find_spec("xformers") is None:
            flag = "--xformers" if args.xformers else "--diffusers_xformers"
            raise UserError(f"{flag} needs xformers: pip install xformers (or use --sdpa, the default)")
        models.unet.enable_xformers_memory_efficient_attention()
        models.vae.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0  # start-up (diffusers: ~2 s)

        models.unet.set_attn_processor(AttnProcessor2_0())
    use_matrix_convs(models.unet)  # CPU: wide layers on small maps as one product (small_map_conv.py)
    if args.opt_channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if args.vae_slices:
        models.vae.enable_slicing()
        models.vae.enable_tiling()


@dataclass
class LoadedNetworks:
    """Networks kept separate from the weights (their multipliers can change per batch with `--am`)."""

    networks: list[Any] = field(default_factory=list)
    pre_calc: bool = False

    def set_multipliers(self, muls: list[float] | None, defaults: list[float]) -> None:
        """Per batch: `--am` values (or the `--network_mul` defaults); `--network_pre_calc` re-merges. spec §8."""
        for net, mul in zip(self.networks, muls or defaults):
            net.set_multiplier(mul)
            if self.pre_calc:
                net.restore_weights()
                net.pre_calculation()


def _network_kwargs(args_list: list[str] | None, index: int) -> dict[str, str]:
    """Network `index`'s `--network_args` string `k=v;k=v` -> kwargs (values stay strings for the plug-in)."""
    text = args_list[index] if args_list and index < len(args_list) else ""
    return parse_network_args([item for item in text.split(";") if item.strip()])


def show_network_metadata(path: str) -> None:
    """`--network_show_meta`: print a network file's safetensors metadata."""
    if not path.endswith(".safetensors"):
        logger.info("%s: no metadata (not a .safetensors file)", path)
        return

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    print(json.dumps({"file": path, "metadata": meta}, indent=2, ensure_ascii=False))


def _network_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(`--network_module`, `--network_weights`) pairs; the counts must agree."""
    modules = args.network_module or []
    weights = args.network_weights or []
    if len(weights) != len(modules):
        raise UserError(f"--network_weights: give one file per --network_module ({len(modules)} modules, "
                        f"{len(weights)} files)")
    return list(zip(modules, weights))


def _kohya_named(module_name: str, tf) -> bool:
    """Whether the family checks apply: our LoRA, or a plug-in file with kohya ``lora_*`` names (LyCORIS)."""
    return module_name == "networks.lora" or bool(tf.modules())


def check_input_files(args: argparse.Namespace) -> None:
    """Before any model loads: every network and embedding file is readable and of one known family."""
    for name, path in _network_pairs(args):
        tf = read_tensor_file(path, "--network_weights")
        if _kohya_named(name, tf):
            family_of(tf, "--network_weights")
    for path in args.textual_inversion_embeddings or []:
        embedding_family(read_tensor_file(path, "--textual_inversion_embeddings"))


def check_networks_fit(args: argparse.Namespace, models: SDModels | FluxModels) -> None:
    """Every network file suits the loaded model: same family, matching widths, at least one layer named.

    A LoRA for another model would otherwise be ignored (no key matches) and the image written anyway. FLUX.1:
    networks.lora_flux checks its file against the model itself (one line naming the modules that fit no layer).
    """
    if isinstance(models, FluxModels):
        return
    shapes = None
    for name, path in _network_pairs(args):
        tf = read_tensor_file(path, "--network_weights")
        if not _kohya_named(name, tf):
            continue  # another plug-in's own key names: the plug-in checks them
        shapes = shapes if shapes is not None else target_weight_shapes(models.text_encoders, models.unet)
        check_fits_layers(tf, shapes, models.family, "--network_weights")


def _network_parts(models: SDModels | FluxModels) -> tuple[Any, Any, torch.nn.Module]:
    """(vae, text encoder(s), U-Net) as plug-ins take them: FLUX.1 as sd-scripts' FLUX scripts pass it
    (the AE, [CLIP-L, T5-XXL], the transformer in the U-Net's place)."""
    if isinstance(models, FluxModels):
        return models.ae, [models.clip_l, models.t5xxl], models.transformer
    return models.vae, models.text_encoders if models.is_sdxl else models.text_encoders[0], models.unet


def load_networks(args: argparse.Namespace, models: SDModels | FluxModels,
                  device: torch.device) -> tuple[LoadedNetworks, list[float]]:
    """Create every `--network_module` network; merge the first N, apply the rest. spec §8.

    Returns the applied networks and their default multipliers (`--am` indexes these, merged ones excluded).
    """
    pairs = _network_pairs(args)
    check_networks_fit(args, models)
    muls = list(args.network_mul or [])
    merge_n = len(pairs) if args.network_merge else (args.network_merge_n_models or 0)
    vae, te, unet = _network_parts(models)
    dtype = next(unet.parameters()).dtype
    loaded, defaults = LoadedNetworks(pre_calc=args.network_pre_calc), []
    for i, (name, path) in enumerate(pairs):
        if args.network_show_meta:
            show_network_metadata(path)
        mul = muls[i] if i < len(muls) else 1.0
        kwargs = _network_kwargs(args.network_args, i)
        module = import_network_module(name)
        network, sd = module.create_network_from_weights(mul, path, vae, te, unet, for_inference=True, **kwargs)
        if i < merge_n:
            network.merge_to(te, unet, sd, dtype, device)
            logger.info("network %s merged (multiplier %s)", path, mul)
            continue
        network.apply_to(te, unet)
        info = network.load_state_dict(sd, strict=False)
        if getattr(info, "unexpected_keys", None):
            logger.warning("network %s: %d unexpected keys, e.g. %s", path, len(info.unexpected_keys),
                           info.unexpected_keys[0])
        network.to(device, dtype=dtype).eval().requires_grad_(False)
        if args.network_pre_calc:
            if not hasattr(network, "pre_calculation"):
                raise UserError(f"--network_pre_calc: {name} networks have no pre_calculation()")
            network.backup_weights()
        loaded.networks.append(network)
        defaults.append(mul)
    return loaded, defaults


def load_ti(args: argparse.Namespace, models: SDModels) -> list[Any] | None:
    """`--textual_inversion_embeddings`: tokens added, rows set; returns the token replacers (or None)."""
    if not args.textual_inversion_embeddings:
        return None

    return load_textual_inversion(models.family, models.text_encoders, models.tokenizers,
                                  args.textual_inversion_embeddings)
