"""One sample of a batch (pixels or cached latents, caption, token ids) and the batch dictionary.

spec dataset-config §6 (conditioning images), §7.3-7.4 (loading into a bucket), §8.1 (token ids),
§9 (augmentations), §11 (batch keys). Every random choice comes from the ``rng`` passed in, drawn
in sd-scripts' order: flip decision, crop (face / random), color_aug, then the caption.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from library.config.dataset_blueprint import SubsetParams
from library.data.augment import applicable_face, color_aug, face_crop
from library.data.buckets import Reso, crop_top_left
from library.data.image_info import ImageInfo
from library.data.images import load_image
from library.data.latent_cache import load_latents_npz
from library.data.te_cache import load_te_outputs
from library.data.transforms import crop_without_bucket, flip_horizontal, resize_area, to_tensor, trim_and_resize
from library.errors import UserError
from library.formats.long_prompts import split_long_ids

CLIP_LENGTH = 77


@dataclass
class Sample:
    """One image's share of a batch before stacking."""

    caption: str
    loss_weight: float
    flipped: bool
    original_size: tuple[int, int]  # (w, h)
    crop_ltrb: Sequence[float]
    target_size: tuple[int, int]  # (w, h)
    image: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    alpha_mask: torch.Tensor | None = None
    cond_image: torch.Tensor | None = None
    input_ids: list[torch.Tensor] | None = None
    te_outputs: tuple | None = None


def load_pixels(info: ImageInfo, subset: SubsetParams, bucketed: bool, resolution: Reso | None,
                rng: random.Random) -> tuple[np.ndarray, tuple[int, int], Sequence[float]]:
    """Decode and fit one image to its bucket (§7.4) or to the fixed resolution (§7.3).

    Returns the (H, W, C) uint8 array (RGBA with ``alpha_mask``), ``original_size`` and ``crop_ltrb``.
    """
    image = load_image(info.path, alpha=subset.alpha_mask)
    if bucketed:
        return trim_and_resize(image, info.bucket, info.resized_size, subset.random_crop, rng)
    face = applicable_face(info.path, subset.face_crop_aug_range)
    if face is not None:
        image = face_crop(image, face, resolution, subset.face_crop_aug_range, subset.random_crop, rng)
    image = crop_without_bucket(image, resolution, subset.random_crop, rng, info.path)
    # on this path the original size is the size after the crop and crop_ltrb is zero (§7.3)
    return image, (resolution[0], resolution[1]), (0, 0, 0, 0)


def image_sample(info: ImageInfo, subset: SubsetParams, bucketed: bool, resolution: Reso | None,
                 flipped: bool, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None, tuple, Sequence]:
    """Uncached path in §7.4 order: load → bucket → color_aug (RGB only) → flip → [-1, 1] tensor."""
    image, original_size, crop_ltrb = load_pixels(info, subset, bucketed, resolution, rng)
    if subset.color_aug:
        rgb = color_aug(np.ascontiguousarray(image[:, :, :3]), rng)
        image = np.concatenate([rgb, image[:, :, 3:]], axis=2) if image.shape[2] == 4 else rgb
    if flipped:
        image = flip_horizontal(image)
    alpha = None
    if subset.alpha_mask:
        alpha = torch.from_numpy(image[:, :, 3].astype(np.float32) / 255.0)
    return to_tensor(image[:, :, :3]), alpha, original_size, crop_ltrb


def cached_sample(info: ImageInfo, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None, tuple, Sequence]:
    """Cached path (§10): the (flipped) latents and the alpha mask stored with them."""
    if info.latents is not None:
        latents = info.latents_flipped if flipped else info.latents
        alpha, original_size, crop_ltrb = info.alpha_mask, info.latents_original_size, info.latents_crop_ltrb
    else:
        cached = load_latents_npz(info.latents_npz, info.latents_npz_flipped if flipped else None)
        latents = cached.latents_flipped if flipped else cached.latents
        alpha, original_size, crop_ltrb = cached.alpha_mask, cached.original_size, cached.crop_ltrb
    if latents is None:
        raise UserError(f"flipped latents are missing from the cache of {info.path}: cache again with flip_aug")
    if alpha is not None and flipped:
        alpha = torch.flip(alpha, [1])
    return latents, alpha, tuple(original_size), tuple(crop_ltrb)


def conditioning_image(info: ImageInfo, target_size: Reso, flipped: bool, bucketed: bool) -> torch.Tensor:
    """The ControlNet/mask image fitted like its image, in [-1, 1] (§6)."""
    cond = load_image(info.cond_path)
    if bucketed:
        # same size as the image (checked at build), so the image's resize then a centre crop
        cond = resize_area(cond, info.resized_size) if cond.shape[1::-1] != tuple(info.resized_size) else cond
        top = (cond.shape[0] - target_size[1]) // 2
        left = (cond.shape[1] - target_size[0]) // 2
        cond = cond[top:top + target_size[1], left:left + target_size[0]]
    elif cond.shape[1::-1] != tuple(target_size):
        # upstream: cv2 LANCZOS4; Pillow's LANCZOS (a=3) is the nearest available filter
        cond = np.asarray(Image.fromarray(cond).resize(tuple(target_size), Image.Resampling.LANCZOS))
    if flipped:
        cond = flip_horizontal(cond)
    return to_tensor(cond)


def get_input_ids(caption: str, tokenizer, max_token_length: int | None) -> torch.Tensor:
    """Token ids (n, 77): padded to 75n+2, then cut into rows of 77 (spec dataset-config §8.1)."""
    length = CLIP_LENGTH if max_token_length is None else max_token_length + 2
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=length)["input_ids"]
    rows = split_long_ids(ids, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return torch.tensor(rows, dtype=torch.long)


def te_outputs_of(info: ImageInfo) -> tuple | None:
    """Cached text-encoder outputs of an image, from memory or its npz (§10.1); None if not cached."""
    if info.te_outputs is not None:
        return info.te_outputs
    if info.te_outputs_npz is not None:
        return load_te_outputs(info.te_outputs_npz)
    return None


def collate(samples: list[Sample], network_multiplier: float, with_alpha: bool, with_cond: bool,
            num_tokenizers: int) -> dict:
    """Stack samples into the batch dictionary of spec dataset-config §11."""
    batch: dict = {"loss_weights": torch.tensor([s.loss_weight for s in samples], dtype=torch.float32)}
    if samples[0].te_outputs is None:
        batch["input_ids"] = torch.stack([s.input_ids[0] for s in samples])
        batch["input_ids2"] = torch.stack([s.input_ids[1] for s in samples]) if num_tokenizers > 1 else None
        batch["text_encoder_outputs1_list"] = None
        batch["text_encoder_outputs2_list"] = None
        batch["text_encoder_pool2_list"] = None
    else:
        batch["input_ids"] = batch["input_ids2"] = None
        for i, name in enumerate(("text_encoder_outputs1_list", "text_encoder_outputs2_list", "text_encoder_pool2_list")):
            batch[name] = torch.stack([torch.as_tensor(s.te_outputs[i]) for s in samples])
    batch["images"] = torch.stack([s.image for s in samples]) if samples[0].image is not None else None
    batch["latents"] = torch.stack([s.latents for s in samples]) if samples[0].latents is not None else None
    batch["captions"] = [s.caption for s in samples]
    batch["original_sizes_hw"] = torch.tensor([(s.original_size[1], s.original_size[0]) for s in samples],
                                              dtype=torch.long).reshape(-1, 2)
    batch["crop_top_lefts"] = torch.tensor([crop_top_left(s.crop_ltrb, s.target_size[0], s.flipped) for s in samples],
                                           dtype=torch.long).reshape(-1, 2)
    batch["target_sizes_hw"] = torch.tensor([(s.target_size[1], s.target_size[0]) for s in samples],
                                            dtype=torch.long).reshape(-1, 2)
    batch["flippeds"] = [s.flipped for s in samples]
    batch["network_multipliers"] = torch.full((len(samples),), float(network_multiplier), dtype=torch.float32)
    if with_cond:
        batch["conditioning_images"] = torch.stack([s.cond_image for s in samples])
    if with_alpha:
        batch["alpha_masks"] = torch.stack([
            s.alpha_mask if s.alpha_mask is not None else torch.ones(s.target_size[1], s.target_size[0])
            for s in samples])
    return batch
