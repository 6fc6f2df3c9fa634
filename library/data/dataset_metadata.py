"""The data behind the dataset ``ss_*`` metadata keys; the metadata module turns it into strings.

spec file-formats §b.1: ``ss_datasets`` (with ``--dataset_config``), ``ss_tag_frequency``,
``ss_dataset_dirs``; ``legacy_dataset_dirs`` gives ``ss_dataset_dirs``/``ss_reg_dataset_dirs`` of a
run without ``--dataset_config``.
"""
from __future__ import annotations

import os


def subset_metadata(dataset, subset, img_count: int) -> dict:
    """One ``subsets`` entry of ``ss_datasets`` (spec file-formats §b.1)."""
    meta = {"img_count": img_count, "num_repeats": subset.num_repeats, "color_aug": bool(subset.color_aug),
            "flip_aug": bool(subset.flip_aug), "random_crop": bool(subset.random_crop),
            "shuffle_caption": bool(subset.shuffle_caption), "keep_tokens": subset.keep_tokens,
            "keep_tokens_separator": subset.keep_tokens_separator,
            "secondary_separator": subset.secondary_separator, "enable_wildcard": bool(subset.enable_wildcard),
            "caption_prefix": subset.caption_prefix, "caption_suffix": subset.caption_suffix}
    if subset.image_dir:
        meta["image_dir"] = os.path.basename(subset.image_dir)
    if dataset.style == "dreambooth":
        meta["class_tokens"] = subset.class_tokens
        meta["is_reg"] = subset.is_reg
    else:
        meta["metadata_file"] = os.path.basename(subset.metadata_file)
    return meta


def dataset_metadata(dataset) -> dict:
    """One entry of ``ss_datasets``; ControlNet-style datasets expose only sizes and counts (§b.1)."""
    params = dataset.params
    resolution = list(params.resolution) if params.resolution is not None else None
    meta = {"is_dreambooth": dataset.style == "dreambooth", "batch_size_per_device": params.batch_size,
            "num_train_images": dataset.num_train_images, "num_reg_images": dataset.num_reg_images,
            "resolution": resolution}
    if dataset.style == "controlnet":  # v0.8.7 wraps an inner DreamBooth dataset and reports none of it
        meta.update({"enable_bucket": False, "min_bucket_reso": None, "max_bucket_reso": None,
                     "tag_frequency": {}, "bucket_info": None, "subsets": []})
        return meta
    plain_buckets = dataset.bucketed and not dataset.train_resolution_buckets
    meta.update({"enable_bucket": bool(dataset.bucketed),
                 "min_bucket_reso": params.min_bucket_reso if plain_buckets else None,
                 "max_bucket_reso": params.max_bucket_reso if plain_buckets else None,
                 "tag_frequency": dataset.tag_frequency, "bucket_info": dataset.bucket_info(),
                 "subsets": [subset_metadata(dataset, s, n) for s, n in zip(dataset.subsets, dataset.img_counts)]})
    return meta


def metadata_datasets(group) -> list[dict]:
    """``ss_datasets`` as a list of plain dicts (JSON-ready)."""
    return [dataset_metadata(d) for d in group.datasets]


def tag_frequency(group) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: per folder/metadata basename; the first dataset using a name wins."""
    merged: dict[str, dict[str, int]] = {}
    for dataset in group.datasets:
        if dataset.style == "controlnet":
            continue
        for name, counts in dataset.tag_frequency.items():
            merged.setdefault(name, counts)
    return merged


def dataset_dirs(group) -> dict[str, dict[str, int]]:
    """``ss_dataset_dirs`` with ``--dataset_config``: reg subsets excluded, repeats get `` (2)``… (§b.1)."""
    dirs: dict[str, dict[str, int]] = {}
    for dataset in group.datasets:
        if dataset.style == "controlnet":
            continue
        for subset, count in zip(dataset.subsets, dataset.img_counts):
            if dataset.style == "dreambooth":
                if subset.is_reg:
                    continue
                name = os.path.basename(subset.image_dir)
            else:
                name = os.path.basename(subset.metadata_file)
            unique, i = name, 2
            while unique in dirs:
                unique, i = f"{name} ({i})", i + 1
            dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": count}
    return dirs


def legacy_dataset_dirs(group) -> tuple[dict, dict]:
    """(``ss_dataset_dirs``, ``ss_reg_dataset_dirs``) of a run without ``--dataset_config`` (one dataset)."""
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    dataset = group.datasets[0]
    for subset, count in zip(dataset.subsets, dataset.img_counts):
        if dataset.style == "finetuning":
            dirs[os.path.basename(subset.metadata_file)] = {"n_repeats": subset.num_repeats, "img_count": count}
        else:
            target = reg_dirs if subset.is_reg else dirs
            target[os.path.basename(subset.image_dir)] = {"n_repeats": subset.num_repeats, "img_count": count}
    return dirs, reg_dirs
