"""The training dataset end to end: DreamBooth, fine-tuning, ControlNet, alpha masks, captions, errors.

spec dataset-config §4-§8, §11; file-formats §b.1 (metadata data).
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from library.config.dataset_blueprint import DatasetParams, SubsetParams
from library.data.dataset import collate_batches
from library.errors import UserError
from tests.data.dataset_helpers import build, db_params, make_folder, write_image

BATCH_KEYS = {"loss_weights", "input_ids", "input_ids2", "text_encoder_outputs1_list", "text_encoder_outputs2_list",
              "text_encoder_pool2_list", "images", "latents", "captions", "original_sizes_hw", "crop_top_lefts",
              "target_sizes_hw", "flippeds", "network_multipliers"}


@pytest.fixture
def db_group(tmp_path):
    train = make_folder(tmp_path / "3_sks dog", [(64, 64), (96, 64), (64, 96), (64, 64)], {1: "sks dog, red"})
    reg = make_folder(tmp_path / "1_dog", [(64, 64)] * 5, seed=50, prefix="r")
    subsets = [SubsetParams(image_dir=str(train), num_repeats=3, class_tokens="sks dog", flip_aug=True),
               SubsetParams(image_dir=str(reg), num_repeats=1, class_tokens="dog", is_reg=True)]
    return build([db_params(subsets, prior_loss_weight=0.5, network_multiplier=0.8)], debug_dataset=True)


def test_dreambooth_end_to_end(db_group):
    group = db_group
    dataset = group.datasets[0]
    assert group.num_train_images == 12 and group.num_reg_images == 5
    # reg balancing: 5 reg images registered once each, then +1 repeats until 12 (§4.3)
    assert sum(i.num_repeats for i in dataset.images if i.is_reg) == 12
    group.set_current_epoch(1)
    seen = Counter()
    for index in range(len(group)):
        batch = group[index]
        assert BATCH_KEYS | {"image_keys"} == set(batch)
        images = batch["images"]
        b, _, h, w = images.shape
        assert images.dtype == torch.float32 and -1 <= images.min() and images.max() <= 1
        assert batch["input_ids"].shape == (b, 1, 77) and batch["input_ids2"] is None
        assert batch["target_sizes_hw"].tolist() == [[h, w]] * b
        assert batch["target_sizes_hw"].dtype == torch.long
        assert torch.allclose(batch["network_multipliers"], torch.full((b,), 0.8))
        infos = {i.key: i for i in dataset.images}
        assert len({infos[k].bucket for k in batch["image_keys"]}) == 1  # never mixes buckets
        for key, weight in zip(batch["image_keys"], batch["loss_weights"].tolist()):
            assert weight == (0.5 if infos[key].is_reg else 1.0)
            seen[key] += 1
    assert sum(seen.values()) == 24  # 12 train + 12 balanced reg samples per epoch
    assert seen[dataset.images[1].key] == 3


def _ss_datasets(group) -> list[dict]:
    """The group as the trainers' metadata writer describes it (``ss_datasets``, spec file-formats §b.1)."""
    from library.formats.metadata import dataset_entry
    from library.training.runners.run_common import dataset_facts

    return [dataset_entry(d) for d in dataset_facts(group)]


def _ss_dataset_dirs(group) -> dict:
    from library.formats.metadata import _dataset_config_keys
    from library.training.runners.run_common import dataset_facts

    return json.loads(_dataset_config_keys(dataset_facts(group))["ss_dataset_dirs"])


def test_captions_and_metadata(db_group):
    dataset = db_group.datasets[0]
    captions = {os.path.basename(i.path): i.caption for i in dataset.images}
    assert captions["img1.png"] == "sks dog, red" and captions["img0.png"] == "sks dog"
    assert dataset.tag_frequency["3_sks dog"] == {"sks dog": 4, "red": 1}
    [meta] = _ss_datasets(db_group)
    assert meta["is_dreambooth"] and meta["num_train_images"] == 12 and meta["num_reg_images"] == 5
    assert meta["resolution"] == [64, 64] and meta["enable_bucket"] and meta["min_bucket_reso"] == 32
    assert [(s["image_dir"], s["img_count"], s["is_reg"]) for s in meta["subsets"]] == [
        ("3_sks dog", 4, False), ("1_dog", 5, True)]
    assert json.dumps(meta)  # JSON-ready
    assert _ss_dataset_dirs(db_group) == {"3_sks dog": {"n_repeats": 3, "img_count": 4}}
    assert db_group.bucket_info()["buckets"]


def test_collate_batches_passes_the_batch_through(db_group):
    batch = db_group[0]
    assert collate_batches([batch]) is batch and collate_batches(batch) is batch


def test_resolution_outside_bucket_limits(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64)])
    with pytest.raises(UserError, match="min_bucket_reso"):
        build([db_params([SubsetParams(image_dir=str(folder))], resolution=(16, 64))])


def test_corrupt_image_named_at_build_time(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64)] * 3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(UserError, match="broken.png"):
        build([db_params([SubsetParams(image_dir=str(folder))])])


def test_truncated_image_found_by_header_scan(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64)] * 2)
    data = (folder / "img1.png").read_bytes()
    (folder / "img1.png").write_bytes(data[: len(data) // 2])  # the header still parses
    params = [db_params([SubsetParams(image_dir=str(folder))])]
    with pytest.raises(UserError, match=r"1 unreadable image, first: .*img1\.png \(image file is truncated\)"):
        build(params)


def test_corrupt_data_inside_a_file_found_by_full_scan_only(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64)] * 2)
    data = bytearray((folder / "img1.png").read_bytes())
    start = data.index(b"IDAT") + 100
    data[start:start + 50] = bytes(b ^ 0x5A for b in data[start:start + 50])  # header and IEND intact
    (folder / "img1.png").write_bytes(bytes(data))
    params = [db_params([SubsetParams(image_dir=str(folder))])]
    build(params)
    with pytest.raises(UserError, match="img1.png"):
        build(params, scan="full")


def test_cache_info_written_then_used(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 32), (32, 64)], {0: "first"})
    subset = SubsetParams(image_dir=str(folder), class_tokens="cls", cache_info=True)
    build([db_params([subset])])
    cache = json.loads((folder / "metadata_cache.json").read_text(encoding="utf-8"))
    path0 = os.path.join(str(folder), "img0.png")
    assert cache[path0] == {"caption": "first", "resolution": [64, 32]}
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    (folder / "img0.caption").write_text("changed", encoding="utf-8")
    group = build([db_params([subset])])
    assert {i.path: i.caption for i in group.datasets[0].images}[path0] == "first"  # from the cache (§4.2)


def test_fine_tuning_metadata_with_train_resolution(tmp_path):
    images = tmp_path / "imgs"
    write_image(images / "a.png", 100, 52)
    write_image(images / "b.jpg", 40, 80)
    meta = {"a": {"caption": "a cat", "tags": "tag1, tag2", "train_resolution": [64, 32]},
            "b": {"tags": "tag3", "train_resolution": [32, 64]}}
    meta_file = tmp_path / "meta.json"
    meta_file.write_text(json.dumps(meta), encoding="utf-8")
    subset = SubsetParams(image_dir=str(images), metadata_file=str(meta_file), num_repeats=2)
    group = build([DatasetParams(style="finetuning", batch_size=1, subsets=[subset])], debug_dataset=True)
    dataset = group.datasets[0]
    assert dataset.buckets.resos == [(32, 64), (64, 32)] and dataset.bucketed
    assert {i.key: i.caption for i in dataset.images} == {"a": "a cat,tag1, tag2", "b": "tag3"}
    assert dataset.tag_frequency == {"meta.json": {"tag1": 1, "tag2": 1}}
    group.set_current_epoch(1)
    shapes = {group[i]["image_keys"][0]: tuple(group[i]["images"].shape[2:]) for i in range(len(group))}
    assert shapes == {"a": (32, 64), "b": (64, 32)} and len(group) == 4
    assert group[0]["original_sizes_hw"].tolist() in ([[52, 100]], [[80, 40]])
    [meta_out] = _ss_datasets(group)
    assert not meta_out["is_dreambooth"] and meta_out["subsets"][0]["metadata_file"] == "meta.json"
    assert _ss_dataset_dirs(group) == {"meta.json": {"n_repeats": 2, "img_count": 2}}


def test_fine_tuning_prepared_npz_latents_used(tmp_path):
    images = tmp_path / "imgs"
    write_image(images / "a.png", 64, 32)
    np.savez(images / "a.npz", latents=np.ones((4, 4, 8), np.float32), original_size=np.array([64, 32]),
             crop_ltrb=np.array([0, 0, 64, 32]))
    meta_file = tmp_path / "meta.json"
    meta_file.write_text(json.dumps({"a": {"caption": "x", "train_resolution": [64, 32]}}), encoding="utf-8")
    subset = SubsetParams(image_dir=str(images), metadata_file=str(meta_file))
    group = build([DatasetParams(style="finetuning", subsets=[subset])])
    batch = group[0]
    assert batch["images"] is None and batch["latents"].shape == (1, 4, 4, 8)
    assert batch["target_sizes_hw"].tolist() == [[32, 64]]


def test_fine_tuning_unknown_key(tmp_path):
    meta_file = tmp_path / "meta.json"
    meta_file.write_text(json.dumps({"nothere": {"caption": "x"}}), encoding="utf-8")
    (tmp_path / "imgs").mkdir()
    subset = SubsetParams(image_dir=str(tmp_path / "imgs"), metadata_file=str(meta_file))
    with pytest.raises(UserError, match="nothere"):
        build([DatasetParams(style="finetuning", resolution=(64, 64), subsets=[subset])])


def _controlnet(tmp_path, image_names, cond_names, size=(64, 64)):
    for i, name in enumerate(image_names):
        write_image(tmp_path / "img" / f"{name}.png", *size, seed=i)
    for i, name in enumerate(cond_names):
        write_image(tmp_path / "cond" / f"{name}.png", *size, seed=100 + i)
    subset = SubsetParams(image_dir=str(tmp_path / "img"), conditioning_data_dir=str(tmp_path / "cond"),
                          flip_aug=True)
    return db_params([subset], style="controlnet", batch_size=2)


def test_controlnet_pairs_and_batches(tmp_path):
    group = build([_controlnet(tmp_path, ["a", "b"], ["a", "b"], size=(96, 64))])
    batch = group[0]
    assert batch["conditioning_images"].shape == batch["images"].shape
    [meta] = _ss_datasets(group)
    assert meta["subsets"] == [] and meta["bucket_info"] is None and meta["is_dreambooth"] is False


def test_controlnet_missing_and_extra_listed(tmp_path):
    with pytest.raises(UserError) as error:
        build([_controlnet(tmp_path, ["a", "b"], ["a", "c"])])
    assert "missing" in str(error.value) and "b.png" in str(error.value)
    assert "extra" in str(error.value) and "c.png" in str(error.value)


def test_controlnet_conditioning_flipped_with_image(tmp_path):
    params = _controlnet(tmp_path, ["a"], ["a"])
    write_image(tmp_path / "cond" / "a.png", 64, 64, seed=0)  # conditioning = the image itself
    params.batch_size = 1
    group = build([params])
    for epoch in range(1, 5):
        group.set_current_epoch(epoch)
        batch = group[0]
        assert torch.equal(batch["images"], batch["conditioning_images"])


def test_alpha_mask_cropped_and_flipped(tmp_path):
    pixels = write_image(tmp_path / "1_x" / "a.png", 64, 64, mode="RGBA")
    subset = SubsetParams(image_dir=str(tmp_path / "1_x"), alpha_mask=True, flip_aug=True)
    group = build([db_params([subset], batch_size=1)])
    expected = torch.from_numpy(pixels[:, :, 3].astype(np.float32) / 255)
    flips = set()
    for epoch in range(1, 20):
        group.set_current_epoch(epoch)
        batch = group[0]
        flipped = batch["flippeds"][0]
        flips.add(flipped)
        mask = expected.flip(1) if flipped else expected
        assert torch.equal(batch["alpha_masks"][0], mask)
        rgb = torch.from_numpy(pixels[:, :, :3]).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(batch["images"][0], rgb.flip(2) if flipped else rgb, atol=1e-6)
    assert flips == {True, False}


@pytest.mark.parametrize("max_token_length,rows", [(None, 1), (150, 2), (225, 3)])
def test_long_caption_input_ids(tmp_path, max_token_length, rows):
    words = " ".join(f"word{i}" for i in range(120))
    folder = make_folder(tmp_path / "1_x", [(64, 64)] * 2, {0: words, 1: words})
    group = build([db_params([SubsetParams(image_dir=str(folder))])], family="sdxl",
                  max_token_length=max_token_length)
    batch = group[0]
    assert batch["input_ids"].shape == (2, rows, 77) and batch["input_ids2"].shape == (2, rows, 77)
    bos, eos = 49406, 49407
    for ids in (batch["input_ids"][0], batch["input_ids2"][0]):
        assert ids[:, 0].tolist() == [bos] * rows
        if rows > 1:
            assert ids[0, -1] == eos  # a full chunk ends with EOS for both pad conventions (§8.1)


def test_no_bucket_requires_exact_size(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(96, 64)])
    with pytest.raises(UserError, match=r"1 wrongly sized image, first: .*img0\.png \(96x64, too large\); .*random_crop"):
        build([db_params([SubsetParams(image_dir=str(folder))], enable_bucket=False)])  # at the scan, not in training
    group = build([db_params([SubsetParams(image_dir=str(folder), random_crop=True)], enable_bucket=False)])
    batch = group[0]
    assert batch["images"].shape == (1, 3, 64, 64) and batch["crop_top_lefts"].tolist() == [[0, 0]]


def test_caption_dropout_every_n_epochs(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64)], {0: "a, b"})
    group = build([db_params([SubsetParams(image_dir=str(folder), caption_dropout_every_n_epochs=2)])])
    captions = []
    for epoch in (1, 2, 3):
        group.set_current_epoch(epoch)
        captions.append(group[0]["captions"][0])
    assert captions == ["a, b", "", "a, b"]


def test_legacy_dataset_dirs_split_reg(db_group):
    """Without --dataset_config: ss_dataset_dirs and ss_reg_dataset_dirs (spec file-formats §b.1)."""
    import argparse

    from library.formats.metadata import _single_dataset_keys
    from library.training.runners.run_common import dataset_facts

    facts = argparse.Namespace(datasets=dataset_facts(db_group), num_processes=1)
    args = argparse.Namespace(resolution=None, train_batch_size=1, gradient_accumulation_steps=1, color_aug=False,
                              flip_aug=False, random_crop=False, shuffle_caption=False, keep_tokens=0)
    keys = _single_dataset_keys(args, facts)
    assert json.loads(keys["ss_dataset_dirs"]) == {"3_sks dog": {"n_repeats": 3, "img_count": 4}}
    assert json.loads(keys["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 5}}
