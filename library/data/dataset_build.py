"""Build one ``TrainDataset`` from resolved ``DatasetParams``: discover, size, balance, bucket.

spec dataset-config §4 (DreamBooth), §5 (fine-tuning), §6 (ControlNet), §4.3 (reg balancing), §7 (buckets).
Numbered steps in ``build_dataset``; each style's differences live in its own helper.
"""
from __future__ import annotations

import logging
import os

from library.config.dataset_blueprint import DatasetParams, SubsetParams
from library.data.augment import applicable_face
from library.data.buckets import BucketSet
from library.data.caption_files import add_tag_frequency
from library.data.discovery import SubsetImages, discover_dreambooth, discover_finetuning, pair_conditioning, \
    write_info_cache
from library.data.image_info import ImageInfo, bad_files_error, read_sizes
from library.data.latent_cache import npz_shapes
from library.data.repeats import balance_reg_images
from library.data.train_dataset import TrainDataset
from library.data.transforms import no_bucket_misfit
from library.data.validation_split import select_part
from library.errors import UserError

logger = logging.getLogger(__name__)


def build_dataset(params: DatasetParams, index: int, seed: int, *, part: str = "train",
                  run_seed: int | None = None) -> TrainDataset | None:
    """Discover, size, balance and bucket the images of dataset ``index`` (spec §4-§7).

    ``part``: "train" or "validation" (``validation_split``, seeded by ``validation_seed`` or ``run_seed``);
    None when that part has no image.
    """
    where = f"datasets[{index}]"
    # 1. images and captions per subset; empty subsets are dropped as sd-scripts does
    subsets, found = _discover(params, where)
    infos = [info for images in found for info in images.infos]
    if params.style == "controlnet":
        pair_conditioning(subsets, infos)
    # fine-tuning buckets come from train_resolution only if every entry has one (§5)
    train_reso = params.style == "finetuning" and all(i.image_size is not None for i in infos)
    # 2. image sizes from headers (this is also the "header" scan of those files)
    verified = _read_missing_sizes(params, infos)
    for subset, subset_images in zip(subsets, found):
        if subset.cache_info and not subset_images.known_sizes:
            write_info_cache(subset, subset_images.infos)
    # 2b. the validation split: by image, before repeats and balancing, so no image is in both parts
    subsets, found = select_part(subsets, found, part, run_seed)
    infos = [info for images in found for info in images.infos]
    if not infos:
        return None
    # 3. fine-tuning: prepared npz latents and train_resolution buckets (§5)
    bucket_set, bucketed = _bucket_set(params, subsets, infos, train_reso, where)
    # 4. reg balancing: reg images repeat until they match the train images (§4.3)
    images, num_train, num_reg = _balance(infos)
    # 5. buckets (§7) and the dataset; images that cannot fit stop the run now, not in a worker
    _assign_buckets(bucket_set, images)
    if not bucketed:
        _check_no_bucket_sizes(params, subsets, images)
    bucket_set.log_summary()
    dataset = TrainDataset(params, index, subsets, [len(f.infos) for f in found], images, bucket_set, bucketed, seed)
    dataset.num_train_images, dataset.num_reg_images = num_train, num_reg
    dataset.train_resolution_buckets = train_reso
    dataset.verified_paths = verified
    for subset, subset_images in zip(subsets, found):
        name = os.path.basename(subset.metadata_file if params.style == "finetuning" else subset.image_dir)
        add_tag_frequency(dataset.tag_frequency, name, subset_images.tag_captions)
    if params.style == "controlnet" and bucketed:
        _check_conditioning_sizes(images)
    return dataset


def _discover(params: DatasetParams, where: str) -> tuple[list[SubsetParams], list[SubsetImages]]:
    subsets, found = [], []
    for j, subset in enumerate(params.subsets):
        if params.style == "controlnet" and subset.random_crop:
            raise UserError(f"{where}.subsets[{j}]: random_crop is not supported with conditioning_data_dir")
        discover = discover_finetuning if params.style == "finetuning" else discover_dreambooth
        images = discover(subset, len(subsets))
        if not images.infos:
            logger.warning("ignoring subset %s: no images found", subset.image_dir or subset.metadata_file)
            continue
        subsets.append(subset)
        found.append(images)
    return subsets, found


def _read_missing_sizes(params: DatasetParams, infos: list[ImageInfo]) -> set[str]:
    """Header sizes of images without one; fine-tuning train_resolution entries keep theirs (§5)."""
    todo = [i.path for i in infos if i.image_size is None and not i.path.endswith(".npz")]
    sizes = read_sizes(todo)
    for info in infos:
        if info.image_size is None and info.path in sizes:
            info.image_size = sizes[info.path]
    return set(sizes)


def _bucket_set(params: DatasetParams, subsets: list[SubsetParams], infos: list[ImageInfo], train_reso: bool,
                where: str) -> tuple[BucketSet, bool]:
    """The dataset's buckets and whether images go through buckets (§7), after §5's npz decision."""
    if params.style == "finetuning":
        if not (train_reso and _npz_usable(subsets, infos)):
            for info in infos:
                info.latents_npz = info.latents_npz_flipped = None
            latents_only = [i.path for i in infos if i.path.endswith(".npz")]
            if latents_only:
                raise UserError(f"{len(latents_only)} metadata entries have only latents ({latents_only[0]}, ...) "
                                "but npz latents cannot be used: every entry needs train_resolution and an npz, "
                                "and no subset may use color_aug or random_crop")
        if train_reso:
            if params.bucket_no_upscale:
                raise UserError(f"{where}: bucket_no_upscale cannot be used when the metadata has "
                                "train_resolution (buckets are precalculated)")
            if not params.enable_bucket:
                logger.info("metadata has bucket info (train_resolution): bucketing enabled")
            return BucketSet.from_resolutions({i.image_size for i in infos}), True
    if params.resolution is None:
        raise UserError(f"{where}: resolution is required when the metadata has no train_resolution")
    if params.enable_bucket and params.style != "finetuning":
        width, height = params.resolution
        if min(width, height) < params.min_bucket_reso or max(width, height) > params.max_bucket_reso:
            raise UserError(f"{where}: resolution {width}x{height} must lie within min_bucket_reso "
                            f"{params.min_bucket_reso} and max_bucket_reso {params.max_bucket_reso}")
    buckets = BucketSet(params.resolution, params.enable_bucket, params.bucket_no_upscale, params.min_bucket_reso,
                        params.max_bucket_reso, params.bucket_reso_steps)
    return buckets, params.enable_bucket


def _npz_usable(subsets: list[SubsetParams], infos: list[ImageInfo]) -> bool:
    """prepare_buckets_latents npz usable: no color_aug/random_crop, every image has one, flips exist (§5).

    Deviation (spec pitfall 7): for flip_aug subsets ``latents_flipped`` inside the npz is accepted as
    well as the legacy ``<key>_flip.npz``, so today's prepare_buckets_latents output is not ignored.
    """
    if any(s.color_aug or s.random_crop for s in subsets):
        return False
    for info in infos:
        if info.latents_npz is None:
            logger.warning("some npz files do not exist: npz latents are not used")
            return False
        if subsets[info.subset].flip_aug and info.latents_npz_flipped is None \
                and "latents_flipped" not in npz_shapes(info.latents_npz):
            logger.warning("no flipped latents for %s: npz latents are not used", info.latents_npz)
            return False
    return True


def _balance(infos: list[ImageInfo]) -> tuple[list[ImageInfo], int, int]:
    """Train images, then registered reg images with their balanced repeats (§4.3)."""
    train = [i for i in infos if not i.is_reg]
    reg = [i for i in infos if i.is_reg]
    num_train = sum(i.num_repeats for i in train)
    num_reg = sum(i.num_repeats for i in reg)
    if not reg:
        return train, num_train, num_reg
    balance = balance_reg_images(num_train, [(position, info.num_repeats) for position, info in enumerate(reg)])
    registered = []
    for position, repeats in balance.repeats.items():  # registration order
        reg[position].num_repeats = repeats
        registered.append(reg[position])
    return train + registered, num_train, num_reg


def _assign_buckets(bucket_set: BucketSet, images: list[ImageInfo]) -> None:
    """Each image's bucket and resize (§7); every image no bucket can take is named in one error."""
    bad = []
    for position, info in enumerate(images):
        try:
            choice = bucket_set.add_image(position, info.image_size, info.num_repeats, name=info.path)
        except UserError as e:
            bad.append(str(e))
            continue
        info.bucket, info.resized_size = choice.bucket, choice.resized
    if bad:
        raise bad_files_error(bad, "unbucketable")


def _check_no_bucket_sizes(params: DatasetParams, subsets: list[SubsetParams], images: list[ImageInfo]) -> None:
    """Without buckets an image must fit ``resolution`` exactly or be cropped down to it (§7.3)."""
    target = params.resolution
    bad = []
    for info in images:
        if info.has_cached_latents:
            continue  # never decoded, so never cropped
        subset = subsets[info.subset]
        can_crop = subset.random_crop or applicable_face(info.path, subset.face_crop_aug_range) is not None
        misfit = no_bucket_misfit(info.image_size, target, can_crop)
        if misfit is not None:
            bad.append(f"{info.path} ({info.image_size[0]}x{info.image_size[1]}, {misfit})")
    if bad:
        raise bad_files_error(bad, "wrongly sized", f"without buckets an image must be {target[0]}x{target[1]}, "
                              "or larger with random_crop; enable_bucket resizes images to fit")


def _check_conditioning_sizes(images: list[ImageInfo]) -> None:
    """With buckets a conditioning image must be the size of its image (§6); checked before training."""
    sizes = read_sizes(sorted({i.cond_path for i in images}))
    bad = [f"{i.cond_path} is {sizes[i.cond_path][0]}x{sizes[i.cond_path][1]}, "
           f"image {i.image_size[0]}x{i.image_size[1]}" for i in images if sizes[i.cond_path] != i.image_size]
    if bad:
        raise bad_files_error(bad, "wrongly sized conditioning")
