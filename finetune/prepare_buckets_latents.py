#!/usr/bin/env python
"""Assign fine-tuning images to aspect-ratio buckets and cache their VAE latents (spec utilities §6).

For every image: the bucket by the training rules (spec dataset-config §7, same ``BucketSet``), its
``train_resolution`` (bucket size floored to multiples of 8) in the metadata JSON, and the latents of
the bucket-cropped image as ``<train_data_dir>/<key>.npz`` with the training cache keys (``latents``,
``original_size``, ``crop_ltrb``, ``latents_flipped`` with ``--flip_aug``), written by the training
cache's own writer. ``fine_tune.py --in_json <out_json>`` then trains from these latents without a VAE.

Deviations: a missing ``in_json`` (or bad option) exits with code 2 and writes nothing (sd-scripts logs and
returns 0); ``out_json`` is written atomically; latents are sampled with a fixed seed (0) so reruns give
the same files; images are decoded in the encoding batches (``--max_data_loader_n_workers`` is accepted
for compatibility only).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python finetune/x.py` from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.data.buckets import BucketSet, Reso  # noqa: E402
from library.data.image_info import ImageInfo  # noqa: E402
from library.data.images import glob_images, read_image_size  # noqa: E402
from library.data.latent_cache import encode_batch, is_cache_valid  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.fileio import write_text_atomic  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402

logger = logging.getLogger(__name__)

VAE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """Options of spec utilities §6."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", type=str, help="folder of the training images")
    p.add_argument("in_json", type=str, help="input metadata JSON (must exist)")
    p.add_argument("out_json", type=str, help="output metadata JSON (train_resolution added)")
    p.add_argument("model_name_or_path", type=str,
                   help="where the VAE comes from: a full SD checkpoint, a VAE file, or a Diffusers folder")
    p.add_argument("--v2", action="store_true", help="ignored (kept for compatibility)")
    p.add_argument("--batch_size", type=int, default=1, help="VAE batch size per bucket (default: 1)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="accepted for compatibility; images are decoded in the encoding batches")
    p.add_argument("--max_resolution", type=str, default="512,512",
                   help="'W,H': bucket area of the largest bucket (default: 512,512)")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="minimum bucket side (default: 256)")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="maximum bucket side (default: 1024)")
    p.add_argument("--bucket_reso_steps", type=int, default=64,
                   help="bucket side step (default: 64; should be a multiple of 8, of 32 for SDXL)")
    p.add_argument("--bucket_no_upscale", action="store_true",
                   help="per-image buckets that never upscale (min/max bucket reso ignored)")
    p.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="VAE dtype (default: no = float32)")
    p.add_argument("--full_path", action="store_true", help="metadata keys are full image paths (else file stems)")
    p.add_argument("--flip_aug", action="store_true", help="also cache latents of the mirrored image")
    p.add_argument("--skip_existing", action="store_true",
                   help="skip images whose npz passes the training cache's reuse test")
    p.add_argument("--recursive", action="store_true", help="include sub-folders (npz mirrored with --full_path)")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it (wrappers import it)


def parse_max_resolution(text: str) -> Reso:
    """``"W,H"`` -> (W, H); anything else names the option."""
    parts = text.split(",")
    try:
        reso = tuple(int(v) for v in parts)
    except ValueError:
        reso = ()
    if len(reso) != 2 or min(reso) <= 0:
        raise UserError(f"--max_resolution {text!r}: expected 'W,H' with two positive integers")
    return reso


def read_metadata(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"in_json: no metadata file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"in_json {path}: cannot read metadata ({e})") from None
    if not isinstance(metadata, dict):
        raise UserError(f"in_json {path}: expected a JSON object keyed by image")
    return metadata


def npz_path(data_dir: str, key: str, full_path: bool, recursive: bool) -> str:
    """``<data_dir>/<stem>.npz``; with ``--full_path --recursive`` the image's sub-folder is mirrored."""
    if full_path:
        base = os.path.splitext(os.path.basename(key))[0]
        relative = os.path.relpath(os.path.dirname(key), data_dir)
    else:
        base, relative = key, ""
    if recursive and relative and relative != ".":
        return os.path.join(data_dir, relative, base) + ".npz"
    return os.path.join(data_dir, base) + ".npz"


def load_vae_encoder(path: str, dtype: torch.dtype, device: str):
    """``encode(images in [-1,1]) -> unscaled latent samples``, VAE from a checkpoint, VAE file or folder."""
    from library.models.loading import load_vae

    if not os.path.exists(path):
        raise UserError(f"model_name_or_path: no such file or folder: {path}")
    # the family only sets config fields (sample size, scaling) that unscaled latents never use
    vae = load_vae(path, "sd1", torch.float32).to(device, dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(images.to(device, dtype)).latent_dist.sample(generator=gen).float().cpu()

    return encode


def check_args(args: argparse.Namespace) -> Reso:
    """Everything that can be wrong, before any model loads or any file is written."""
    max_reso = parse_max_resolution(args.max_resolution)
    if not os.path.isdir(args.train_data_dir):
        raise UserError(f"train_data_dir: no such folder: {args.train_data_dir}")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if args.bucket_reso_steps < 1:
        raise UserError("--bucket_reso_steps must be at least 1")
    if args.bucket_reso_steps % 8:
        logger.warning("bucket_reso_steps %d is not a multiple of 8: latents may not match", args.bucket_reso_steps)
    if args.bucket_reso_steps % 32:
        logger.warning("bucket_reso_steps %d is not a multiple of 32: not usable with SDXL", args.bucket_reso_steps)
    return max_reso


def prepare(args: argparse.Namespace) -> None:
    """1. check  2. metadata + VAE  3. bucket and encode per bucket batch  4. write out_json."""
    max_reso = check_args(args)
    metadata = read_metadata(args.in_json)
    images = glob_images(args.train_data_dir, args.recursive)
    logger.info("found %d images", len(images))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encode = load_vae_encoder(args.model_name_or_path, VAE_DTYPES[args.mixed_precision], device)
    buckets = BucketSet(max_reso, True, args.bucket_no_upscale, args.min_bucket_reso, args.max_bucket_reso,
                        args.bucket_reso_steps)
    pending: dict[Reso, list] = {}
    for path in tqdm(images, smoothing=0):
        try:
            size = read_image_size(path)
        except UserError as e:  # as sd-scripts: an unreadable image is reported and skipped
            logger.error("%s", e)
            continue
        key = path if args.full_path else os.path.splitext(os.path.basename(path))[0]
        choice = buckets.add_image(key, size)
        bucket = choice.bucket
        metadata.setdefault(key, {})["train_resolution"] = [bucket[0] - bucket[0] % 8, bucket[1] - bucket[1] % 8]
        npz = npz_path(args.train_data_dir, key, args.full_path, args.recursive)
        if args.skip_existing and is_cache_valid(npz, bucket, args.flip_aug, False):
            continue
        info = ImageInfo(key, path, "", 1, False, 0, image_size=size, bucket=bucket, resized_size=choice.resized,
                         latents_npz=npz)
        batch = pending.setdefault(bucket, [])
        batch.append((info, args.flip_aug, False))
        if len(batch) >= args.batch_size:  # encoded as soon as a bucket fills, as sd-scripts
            encode_batch(batch, encode, to_disk=True)
            batch.clear()
    for batch in pending.values():
        if batch:
            encode_batch(batch, encode, to_disk=True)
    buckets.log_summary()
    write_text_atomic(args.out_json, json.dumps(metadata, indent=2))
    logger.info("wrote metadata %s", args.out_json)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    prepare(args)


if __name__ == "__main__":
    main()
