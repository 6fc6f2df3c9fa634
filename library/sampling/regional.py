"""gen_img's regional LoRA: `--mask_path` with applied networks makes network i act on the i-th sub-prompt
(prompt split on " AND ") within the i-th region of the mask. sd-scripts v0.8.7 semantics; the per-module math is
networks/lora_regional.py.

Regions (upstream): the first mask image (RGB), resized to --W x --H (x --highres_fix_scale with hires fix) when
both are given. Without `--network_regional_mask_max_color_codes`, network i < 3 takes channel i (R, G, B);
with it, network i < max takes the pixels of colour code i+1 (bit 0 = R, bit 1 = G, bit 2 = B, each 0 or 255).
Later networks take the whole image, and so does an all-zero region. The mask is not used for inpainting then.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from library.errors import UserError
from library.sampling.img2img import list_images, open_image
from networks.lora_regional import module_role

logger = logging.getLogger(__name__)

SEPARATOR = " AND "
CHANNEL_REGIONS = 3  # without colour codes: one region per RGB channel


def applied_network_count(args: argparse.Namespace) -> int:
    """How many `--network_module` networks stay applied (not merged): those regional LoRA can use."""
    total = len(args.network_module or [])
    merged = total if args.network_merge else min(args.network_merge_n_models or 0, total)
    return total - merged


def regional_requested(args: argparse.Namespace) -> bool:
    """Upstream's rule: `--mask_path` together with applied networks means regional LoRA (not inpainting)."""
    return bool(args.mask_path) and applied_network_count(args) > 0


def check_regional_options(args: argparse.Namespace) -> None:
    """Before any model loads: options regional LoRA cannot serve, one line each."""
    if args.network_regional_mask_max_color_codes is not None and not regional_requested(args):
        raise UserError("--network_regional_mask_max_color_codes needs --mask_path and --network_module (regional "
                        "LoRA with applied, not merged, networks)")
    if not regional_requested(args):
        return
    if args.network_pre_calc:
        raise UserError("--network_pre_calc cannot be combined with regional LoRA (--mask_path with "
                        "--network_module): merged weights cannot be limited to a region")
    if args.control_net_models or args.control_net_lllite_models:
        raise UserError("regional LoRA (--mask_path with --network_module) cannot be combined with ControlNet / "
                        "ControlNet-LLLite (they do not take per-sub-prompt conditioning)")


def network_masks(image: Image.Image, n_networks: int, max_color_codes: int | None) -> list[torch.Tensor]:
    """One (H, W) mask in [0, 1] per network from the RGB mask image (upstream's rules, module docstring)."""
    pixels = np.asarray(image.convert("RGB"))
    masks = []
    for i in range(n_networks):
        if max_color_codes is None and i < CHANNEL_REGIONS:
            region = pixels[:, :, i].astype(np.float32) / 255.0
        elif max_color_codes is not None and i < max_color_codes:
            code = np.array([(i + 1) & 1, ((i + 1) >> 1) & 1, ((i + 1) >> 2) & 1]) * 255
            region = np.all(pixels == code, axis=2).astype(np.float32)
        else:
            region = np.ones(pixels.shape[:2], dtype=np.float32)
        masks.append(torch.from_numpy(region))
    return masks


def load_region_image(args: argparse.Namespace) -> Image.Image:
    """The first `--mask_path` image, resized as upstream resizes masks (only when --W and --H are both given)."""
    image = open_image(list_images(args.mask_path, "--mask_path")[0], "RGB", "--mask_path")
    if args.W is not None and args.H is not None:
        w, h = args.W, args.H
        if args.highres_fix_scale:
            w, h = int(w * args.highres_fix_scale + 0.5), int(h * args.highres_fix_scale + 0.5)
        image = image.resize((w, h), Image.LANCZOS)
    return image


def check_sub_prompts(prompt: str, n_networks: int) -> int:
    """The prompt's sub-prompt count; at least one per network (upstream asserts it)."""
    n = len(prompt.split(SEPARATOR))
    if n < n_networks:
        raise UserError(f"regional LoRA: {n_networks} networks need at least {n_networks} sub-prompts joined by "
                        f"'{SEPARATOR.strip()}', the prompt has {n}: {prompt}")
    return n


def check_last_network(network: Any, unet: torch.nn.Module, path: str) -> None:
    """The last network repeats the query per sub-prompt and blends the results, in its cross-attention to_q and
    to_out modules (upstream's design): it needs both on every cross-attention (upstream crashes otherwise)."""
    adapted = {id(m.org_module) for m in network.unet_loras if module_role(m.lora_name) in ("query", "out")}
    for name, module in unet.named_modules():
        if name.endswith("attn2") and not (id(module.to_q) in adapted and id(module.to_out[0]) in adapted):
            raise UserError(f"regional LoRA: the last network ({path}) has no LoRA on {name}.to_q / to_out; the "
                            "last network must adapt every cross-attention (it combines the sub-prompts there, as "
                            "upstream): list a network that does last")


class RegionalLoRA:
    """The applied networks of a regional run; prepares each U-Net batch and builds its conditioning."""

    def __init__(self, networks: Sequence[Any], masks: Sequence[torch.Tensor]):
        self.networks = list(networks)
        for i, (net, mask) in enumerate(zip(self.networks, masks)):
            net.set_region(i, i == len(self.networks) - 1, mask)

    @classmethod
    def from_args(cls, args: argparse.Namespace, networks: Sequence[Any],
                  unet: torch.nn.Module) -> "RegionalLoRA | None":
        """The regional set-up of a run, or None when the run is not regional."""
        if not regional_requested(args) or not networks:
            return None
        for net in networks:
            if not (hasattr(net, "set_region") and hasattr(net, "set_current_generation")
                    and hasattr(net, "unet_loras")):
                raise UserError(f"regional LoRA (--mask_path with --network_module): {type(net).__module__} "
                                "networks cannot be limited to a region (networks.lora and its variants can)")
        check_last_network(networks[-1], unet, args.network_weights[-1])
        image = load_region_image(args)
        logger.info("regional LoRA: %d networks, regions from %s", len(networks), args.mask_path)
        return cls(networks, network_masks(image, len(networks), args.network_regional_mask_max_color_codes))

    def prepare(self, batch_size: int, num_sub_prompts: int, width: int, height: int,
                ds_ratio: float | None) -> None:
        """Per U-Net batch (upstream calls it before every pipeline call): sizes and a fresh shared dict."""
        shared: dict = {}
        for net in self.networks:
            net.set_current_generation(batch_size, num_sub_prompts, width, height, shared, ds_ratio)

    def conditioning(self, pipe: Any, specs: Sequence[Any],
                     settings: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(context, SDXL added conditioning) of the [negative (B), positive (B)] branches: the context holds the
        B negatives, then each image's N sub-prompts (B·N rows). SDXL's pooled conditioning of an image is its
        last sub-prompt's, as upstream."""
        if settings.scale <= 1.0:
            raise UserError("regional LoRA needs classifier-free guidance (--scale above 1; upstream crashes "
                            "without it)")
        if settings.negative_scale is not None:
            raise UserError("regional LoRA cannot be combined with --negative_scale / --nl (upstream crashes)")
        if specs[0].control_images is not None:
            raise UserError("regional LoRA cannot be combined with ControlNet / ControlNet-LLLite")
        subs = [s.prompt.split(SEPARATOR) for s in specs]
        for s in specs:
            check_sub_prompts(s.prompt, len(self.networks))
        b, n = len(specs), len(subs[0])
        if any(len(p) != n for p in subs):
            raise UserError("regional LoRA: the images of one batch must have the same number of sub-prompts")
        ds_ratio = settings.deep_shrink.ratio if settings.deep_shrink is not None else None
        self.prepare(b, n, settings.width, settings.height, ds_ratio)
        # negatives first, then the sub-prompts image by image: the layout the networks' modules expect
        emb = pipe.encode([s.negative_prompt or "" for s in specs] + [p for parts in subs for p in parts])
        dtype, device = pipe.unet_dtype, pipe.device
        added = None
        if pipe.models.is_sdxl:
            last = [b + i * n + n - 1 for i in range(b)]
            pooled = torch.cat([emb.pooled[:b], emb.pooled[last]])
            time_ids = torch.cat([pipe._time_ids(specs, settings, negative=True),
                                  pipe._time_ids(specs, settings, negative=False)])
            added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
        return emb.context.to(device, dtype), added


__all__ = ["RegionalLoRA", "SEPARATOR", "applied_network_count", "check_regional_options", "load_region_image",
           "check_sub_prompts", "network_masks", "regional_requested"]
