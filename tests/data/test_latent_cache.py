"""Latent cache in memory and on disk: keys, shapes, reuse, recompute, atomic writes, refusals (spec §10)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from library.config.dataset_blueprint import SubsetParams
from library.data.latent_cache import cache_latents, is_cache_valid
from library.errors import UserError
from tests.data.dataset_helpers import build, db_params, fake_encode, make_folder


class CountingEncoder:
    """fake_encode that records the batch shapes it was given."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, images):
        self.calls.append(tuple(images.shape))
        return fake_encode(images)


def _group(folder, resolution=(64, 64), flip=False, alpha=False, **kw):
    subset = SubsetParams(image_dir=str(folder), flip_aug=flip, alpha_mask=alpha, **kw)
    return build([db_params([subset], resolution=resolution, batch_size=2)])


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "1_x", [(64, 64), (48, 144), (64, 64)])


def test_disk_cache_keys_shapes_and_batch(folder):
    group = _group(folder, flip=True)
    encoder = CountingEncoder()
    cache_latents(group, encoder, vae_batch_size=4, to_disk=True)
    names = sorted(os.listdir(folder))
    assert names == ["img0.npz", "img0.png", "img1.npz", "img1.png", "img2.npz", "img2.png"]  # no temp files
    with np.load(folder / "img1.npz") as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped"}
        info = {i.path: i for i in group.datasets[0].images}[str(folder / "img1.png")]
        bw, bh = info.bucket
        assert npz["latents"].shape == (4, bh // 8, bw // 8) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [48, 144] and (bw, bh) == (32, 96)
        assert npz["latents_flipped"].shape == npz["latents"].shape
    # one encode per bucket, plus its flipped pass
    assert sorted(encoder.calls) == sorted([(2, 3, 64, 64)] * 2 + [(1, 3, bh, bw)] * 2)
    group.set_current_epoch(1)
    for index in range(len(group)):
        batch = group[index]
        assert batch["images"] is None and batch["latents"].shape[1] == 4
        h, w = batch["latents"].shape[2:]
        assert batch["target_sizes_hw"].tolist()[0] == [h * 8, w * 8]


def test_flipped_latents_picked_when_flipped(folder):
    group = _group(folder, flip=True)
    cache_latents(group, fake_encode, vae_batch_size=2, to_disk=False)
    info = group.datasets[0].images[0]
    assert info.latents is not None and info.latents_flipped is not None
    flips = set()
    for epoch in range(1, 12):
        group.set_current_epoch(epoch)
        for index in range(len(group)):
            batch = group[index]
            for latent, flipped in zip(batch["latents"], batch["flippeds"]):
                flips.add(flipped)
                matches = [i for i in group.datasets[0].images
                           if torch.equal(i.latents_flipped if flipped else i.latents, latent)]
                assert matches
    assert flips == {True, False}


def test_reuse_when_valid_recompute_when_settings_change(folder):
    cache_latents(_group(folder), fake_encode, 2, to_disk=True)
    mtimes = {n: os.stat(folder / n).st_mtime_ns for n in os.listdir(folder) if n.endswith(".npz")}
    encoder = CountingEncoder()
    cache_latents(_group(folder), encoder, 2, to_disk=True)
    assert encoder.calls == []  # all valid: nothing encoded
    cache_latents(_group(folder, flip=True), encoder, 2, to_disk=True)  # flip_aug on: latents_flipped missing
    assert encoder.calls and all("latents_flipped" in np.load(folder / n).files for n in mtimes)
    encoder.calls.clear()
    cache_latents(_group(folder, resolution=(128, 128), flip=True), encoder, 2, to_disk=True)  # new buckets
    assert {c[2:] for c in encoder.calls} >= {(128, 128)}
    with np.load(folder / "img0.npz") as npz:
        assert npz["latents"].shape == (4, 16, 16)


def test_alpha_mask_presence_must_match(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64)])
    cache_latents(_group(folder), fake_encode, 1, to_disk=True)
    npz_path = str(folder / "img0.npz")
    assert is_cache_valid(npz_path, (64, 64), flip_aug=False, alpha_mask=False)
    assert not is_cache_valid(npz_path, (64, 64), flip_aug=False, alpha_mask=True)
    group = _group(folder, alpha=True)
    cache_latents(group, fake_encode, 1, to_disk=True)
    with np.load(npz_path) as npz:
        assert npz["alpha_mask"].shape == (64, 64)
    assert group[0]["alpha_masks"].shape == (1, 64, 64)


def test_flip_batches_follow_each_subset(tmp_path):
    """Pitfall 13 fixed: one subset flips, the other does not, in the same dataset and bucket."""
    a = make_folder(tmp_path / "1_a", [(64, 64)] * 2)
    b = make_folder(tmp_path / "1_b", [(64, 64)] * 2, seed=9)
    subsets = [SubsetParams(image_dir=str(a), flip_aug=True), SubsetParams(image_dir=str(b), flip_aug=False)]
    group = build([db_params(subsets)])
    cache_latents(group, fake_encode, vae_batch_size=8, to_disk=False)
    for info in group.datasets[0].images:
        assert (info.latents_flipped is not None) == (info.subset == 0)


def test_color_aug_and_random_crop_refused(folder):
    with pytest.raises(UserError, match="color_aug"):
        cache_latents(_group(folder, color_aug=True), fake_encode, 1, to_disk=False)
    with pytest.raises(UserError, match="random_crop"):
        build([db_params([SubsetParams(image_dir=str(folder), random_crop=True)])], latents_cache_expected=True)


def test_nan_latents_name_the_image(folder):
    def nan_encode(images):
        return torch.full_like(fake_encode(images), float("nan"))

    with pytest.raises(UserError, match=r"NaN.*img\d\.png"):
        cache_latents(_group(folder), nan_encode, 1, to_disk=True)
    assert not [n for n in os.listdir(folder) if n.endswith(".npz") or n.endswith(".tmp")]


def test_non_main_process_only_learns_paths(folder):
    group = _group(folder)
    encoder = CountingEncoder()
    cache_latents(group, encoder, 2, to_disk=True, is_main_process=False)
    assert encoder.calls == [] and all(i.latents_npz.endswith(".npz") for i in group.datasets[0].images)
