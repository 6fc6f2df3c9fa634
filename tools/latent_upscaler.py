"""sd-scripts' latent upscaler (v0.8.7 `tools/latent_upscaler.py`): a hires-fix plug-in and a command line.

As a plug-in: `gen_img.py ... --highres_fix_scale 0.5 --highres_fix_upscaler tools.latent_upscaler
--highres_fix_upscaler_args weights=upscaler.safetensors` enlarges each 1st-stage image with LANCZOS, encodes it
with the VAE and refines the latents with the model (library/models/latent_upscaler.py) before the 2nd stage.
Weights: upstream's files (.safetensors or a plain .pt/.ckpt state dict, same names and shapes).

As a command line: `python tools/latent_upscaler.py --vae_path MODEL_OR_VAE --weights W --image_pattern "in/*.png"
--output_dir out` writes `<name>_upscaled<ext>` at twice the size (and `<name>_lanczos4<ext>` with `--debug`).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.fileio import atomic_path  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.models.latent_upscaler import Upscaler, load_upscaler_model  # noqa: E402
from library.models.loading import load_vae  # noqa: E402

logger = logging.getLogger(__name__)

_ARGS = "--highres_fix_upscaler_args "


def create_upscaler(**kwargs: str) -> Upscaler:
    """gen_img's plug-in entry: `weights=<file>` (required); any other key is refused rather than ignored."""
    unknown = sorted(set(kwargs) - {"weights"})
    if unknown:
        raise UserError(f"{_ARGS}{';'.join(f'{k}=' for k in unknown)}: tools.latent_upscaler takes only "
                        "weights=<file>")
    weights = kwargs.get("weights")
    if not weights:
        raise UserError(f"{_ARGS}weights=<file> is required by tools.latent_upscaler")
    return load_upscaler_model(weights, f"{_ARGS}weights=")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_path", type=str, default=None,
                        help="VAE: a Diffusers model folder (its vae/), a Diffusers VAE folder or an LDM file")
    parser.add_argument("--weights", type=str, default=None, help="upscaler weights (.safetensors, .pt, .ckpt)")
    parser.add_argument("--image_pattern", type=str, default=None, help="glob of the images to upscale")
    parser.add_argument("--output_dir", type=str, default=".", help="folder for the upscaled images")
    parser.add_argument("--batch_size", type=int, default=4, help="latents per upscaler call")
    parser.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE encode / decode call")
    parser.add_argument("--debug", action="store_true",
                        help="also write the plain LANCZOS enlargement (<name>_lanczos4<ext>)")
    add_logging_arguments(parser)
    return parser


def _check(args: argparse.Namespace) -> list[str]:
    """Every input named and present, before any model is loaded; returns the images."""
    for option in ("vae_path", "weights", "image_pattern"):
        if not getattr(args, option):
            raise UserError(f"--{option} is required")
    for option in ("batch_size", "vae_batch_size"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option} {getattr(args, option)}: must be 1 or more")
    if not os.path.exists(args.vae_path):
        raise UserError(f"--vae_path {args.vae_path}: no such file or folder")
    paths = sorted(glob.glob(args.image_pattern))
    if not paths:
        raise UserError(f"--image_pattern {args.image_pattern}: matches no file")
    return paths


def _open_cropped(path: str) -> Image.Image:
    """RGB, cropped at the bottom/right to multiples of 8 (upstream)."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise UserError(f"--image_pattern: {path}: not a readable image ({e})") from None
    return image.crop((0, 0, image.width - image.width % 8, image.height - image.height % 8))


def _save(image: Image.Image, path: str) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))


@torch.no_grad()
def _decode(vae, latents: torch.Tensor, batch: int) -> list[Image.Image]:
    images = []
    for i in range(0, len(latents), batch):
        x = vae.decode(latents[i:i + batch].to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        arrays = ((x.float().cpu().permute(0, 2, 3, 1) + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
        images += [Image.fromarray(a) for a in arrays]
    return images


def upscale_images(args: argparse.Namespace) -> list[str]:
    """The command line's run: images of one size go through the upscaler together; returns the written paths."""
    paths = _check(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # upstream: fp16 (a GPU)
    upscaler = create_upscaler(weights=args.weights).to(device, dtype)
    vae = load_vae(args.vae_path, "sd1", dtype).to(device).eval()
    images = {p: _open_cropped(p) for p in paths}
    written = []
    for size in tqdm(sorted({im.size for im in images.values()}), desc="sizes"):
        group = [p for p in paths if images[p].size == size]
        w, h = size[0] * 2, size[1] * 2
        latents = upscaler.upscale(vae, [images[p] for p in group], None, dtype, w, h, args.batch_size,
                                   args.vae_batch_size)
        for path, image in zip(group, _decode(vae, latents, args.vae_batch_size)):
            stem, ext = os.path.splitext(os.path.basename(path))
            if args.debug:
                lanczos = images[path].resize((w, h), Image.LANCZOS)
                _save(lanczos, os.path.join(args.output_dir, f"{stem}_lanczos4{ext}"))
            written.append(os.path.join(args.output_dir, f"{stem}_upscaled{ext}"))
            _save(image, written[-1])
    return written


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[str]:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    return upscale_images(args)


if __name__ == "__main__":
    main()
