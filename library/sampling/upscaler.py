"""gen_img's `--highres_fix_upscaler MODULE` / `--highres_fix_upscaler_args k=v;k=v`: a plug-in that does the
hires-fix upscale between the 1st and the 2nd stage (spec generation §1.4, §7; e.g. `tools.latent_upscaler`).

The plug-in interface is upstream's:
* the module defines `create_upscaler(**kwargs)`; every `k=v` of `--highres_fix_upscaler_args` arrives as a
  string keyword argument; the returned object is moved with `.to(dtype).to(device)`;
* `upscaler.support_latents()`: True -> it is given the 1st-stage latents (scaled, as the U-Net sees them),
  False -> the decoded 1st-stage PIL images;
* `upscaler.upscale(vae, lowreso_images, lowreso_latents, dtype, width, height, batch_size, vae_batch_size)`
  (the unused input is None; width/height: the final size) returns either a list of PIL images of the final
  size (VAE-encoded for the 2nd stage like the LANCZOS images) or a latent tensor `(B, 4, height/8, width/8)`
  already multiplied by the VAE scaling factor (used as the 2nd stage's init latents directly).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Sequence

import torch
from PIL import Image

from library.errors import UserError
from library.sampling.img2img import vae_scale_factor
from networks.network_host import parse_network_args

logger = logging.getLogger(__name__)


def parse_upscaler_args(text: str | None) -> dict[str, str]:
    """`k=v;k=v` -> {k: v} (strings, as upstream). Empty parts (a trailing `;`) are skipped; a value may hold `=`."""
    parts = [part for part in (text or "").split(";") if part.strip()]
    return parse_network_args(parts, option="--highres_fix_upscaler_args")


def check_upscaler_options(args: Any) -> None:
    """Checks before any model is loaded: malformed args are an error; options that would do nothing warn."""
    if args.highres_fix_upscaler_args is not None:
        parse_upscaler_args(args.highres_fix_upscaler_args)
        if not args.highres_fix_upscaler:
            logger.warning("--highres_fix_upscaler_args does nothing without --highres_fix_upscaler")
    if args.highres_fix_upscaler and not args.highres_fix_scale:
        logger.warning("--highres_fix_upscaler does nothing without --highres_fix_scale (hires fix); not loaded")
    if args.highres_fix_upscaler and args.highres_fix_scale and args.highres_fix_latents_upscaling:
        logger.warning("--highres_fix_latents_upscaling is ignored with --highres_fix_upscaler (the upscaler "
                       "decides between latents and images with support_latents())")


def load_upscaler(module_name: str, args_text: str | None, dtype: torch.dtype, device: torch.device) -> Any:
    """Import `module_name`, `create_upscaler(**kwargs)`, move it to dtype/device."""
    kwargs = parse_upscaler_args(args_text)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--highres_fix_upscaler {module_name}: cannot import the module ({e})") from e
    create = getattr(module, "create_upscaler", None)
    if not callable(create):
        raise UserError(f"--highres_fix_upscaler {module_name}: the module defines no create_upscaler(**kwargs)")
    logger.info("create upscaler %s with %s", module_name, kwargs)
    upscaler = create(**kwargs)
    for method in ("support_latents", "upscale"):
        if not callable(getattr(upscaler, method, None)):
            raise UserError(f"--highres_fix_upscaler {module_name}: create_upscaler() returned an object without "
                            f"{method}()")
    if callable(getattr(upscaler, "to", None)):
        upscaler.to(dtype).to(device)
    return upscaler


def run_upscaler(upscaler: Any, vae: torch.nn.Module, first_images: Sequence[Image.Image], first_latents: torch.Tensor,
                 dtype: torch.dtype, width: int, height: int, vae_batch_size: int | None
                 ) -> tuple[list[Image.Image] | None, torch.Tensor | None]:
    """One batch through the upscaler; returns (final-size images, None) or (None, scaled init latents)."""
    latents_in = bool(upscaler.support_latents())
    batch_size = len(first_images)
    out = upscaler.upscale(vae, None if latents_in else list(first_images), first_latents if latents_in else None,
                           dtype, width, height, batch_size, vae_batch_size or batch_size)
    if isinstance(out, torch.Tensor):
        f = vae_scale_factor(vae)
        expected = (batch_size, first_latents.shape[1], height // f, width // f)
        if tuple(out.shape) != expected:
            raise UserError(f"--highres_fix_upscaler: upscale() returned latents of shape {tuple(out.shape)}, "
                            f"expected {expected}")
        return None, out.float()
    images = list(out) if isinstance(out, (list, tuple)) else None
    if (images is None or len(images) != batch_size
            or not all(isinstance(im, Image.Image) and im.size == (width, height) for im in images)):
        raise UserError(f"--highres_fix_upscaler: upscale() must return {batch_size} PIL image(s) of "
                        f"{width}x{height} or a latent tensor, got {type(out).__name__}")
    return [im.convert("RGB") for im in images], None
