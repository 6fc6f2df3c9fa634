"""Batches are a pure function of (seed, epoch, index): fetch order, workers and resume do not matter.

spec dataset-config §7.5 (per-epoch order); the per-sample RNG is this project's design (dataset.py doc).
"""
from __future__ import annotations

import pytest

from library.config.dataset_blueprint import SubsetParams
from library.data.dataset import make_dataloader
from tests.data.dataset_helpers import assert_batches_equal, build, db_params, make_folder

CAPTION = "sks dog, red, sitting, grass, sunny, park"


@pytest.fixture
def params(tmp_path):
    sizes = [(64, 64), (96, 64), (64, 96), (80, 80), (64, 64), (128, 64)]
    folder = make_folder(tmp_path / "2_sks", sizes, {i: CAPTION for i in range(len(sizes))})
    subset = SubsetParams(image_dir=str(folder), num_repeats=2, flip_aug=True, color_aug=True, random_crop=True,
                          shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.2,
                          caption_dropout_rate=0.1)
    return [db_params([subset], batch_size=2)]


def _epoch(group, epoch):
    group.set_current_epoch(epoch)
    return [group[i] for i in range(len(group))]


def test_same_seed_same_batches_and_different_seed_differs(params):
    a, b, c = build(params, seed=7), build(params, seed=7), build(params, seed=8)
    for epoch in (1, 2):
        batches_a, batches_b, batches_c = _epoch(a, epoch), _epoch(b, epoch), _epoch(c, epoch)
        for x, y in zip(batches_a, batches_b):
            assert_batches_equal(x, y)
    assert [x["captions"] for x in batches_a] != [x["captions"] for x in batches_c]


def test_item_independent_of_fetch_order(params):
    group = build(params, seed=3)
    group.set_current_epoch(2)
    last = len(group) - 1
    first_fetched = group[last]
    for i in range(last):
        group[i]
    assert_batches_equal(first_fetched, group[last])


def test_epochs_reshuffle_and_randomness_varies(params):
    group = build(params, seed=3)
    one, two = _epoch(group, 1), _epoch(group, 2)
    assert [b["captions"] for b in one] != [b["captions"] for b in two]
    again = _epoch(build(params, seed=3), 2)  # jumping straight to epoch 2 gives the same epoch 2
    for x, y in zip(two, again):
        assert_batches_equal(x, y)


def test_two_workers_equal_zero_workers(params):
    reference = build(params, seed=5)
    workers = build(params, seed=5)
    loader0 = make_dataloader(reference, num_workers=0)
    loader2 = make_dataloader(workers, num_workers=2, persistent_workers=True)
    for epoch in (1, 2):  # the epoch change must reach persistent workers
        reference.set_current_epoch(epoch)
        workers.set_current_epoch(epoch)
        for x, y in zip(loader0, loader2, strict=True):
            assert_batches_equal(x, y)


def test_resume_mid_epoch(params):
    straight = build(params, seed=11)
    loader = make_dataloader(straight)
    straight.set_current_epoch(1)
    list(loader)
    straight.set_current_epoch(2)
    batches = []
    state = None
    for i, batch in enumerate(loader):
        if i == 2:
            state = straight.state_dict()
        batches.append(batch)
    resumed = build(params, seed=999)  # the seed comes back from the state
    resumed.load_state_dict(state)
    resumed_loader = make_dataloader(resumed)
    resumed_loader.sampler.skip_first(2)
    rest = list(resumed_loader)
    assert len(rest) == len(batches) - 2
    for x, y in zip(batches[2:], rest):
        assert_batches_equal(x, y)
    assert len(list(resumed_loader)) == len(batches)  # the skip applies once


def test_sharded_loaders_cover_the_epoch(params):
    group = build(params, seed=2)
    total = len(group)
    shards = [list(make_dataloader(group, epoch=1, process_index=p, num_processes=2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-total // 2)
    group.set_current_epoch(1)
    expected = [group[i] for i in range(total)]
    for i, batch in enumerate(expected):
        assert_batches_equal(batch, shards[i % 2][i // 2])
    skipped = list(make_dataloader(group, epoch=1, skip=1, process_index=1, num_processes=2))
    assert_batches_equal(skipped[0], shards[1][1])


@pytest.mark.parametrize("workers", [0, 2])
def test_token_warmup_follows_the_optimizer_step(tmp_path, workers):
    """--token_warmup_step: the batch at place p of epoch e sees step (e - 1) * ceil(batches / accum) + p // accum
    (the count the loop has reached when it takes that batch), with and without prefetching workers."""
    tags = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"]
    folder = make_folder(tmp_path / "1_x", [(64, 64)] * 6, {i: ", ".join(tags) for i in range(6)})
    subset = SubsetParams(image_dir=str(folder), num_repeats=1, token_warmup_min=1, token_warmup_step=7)
    group = build([db_params([subset], batch_size=1)], seed=4)
    batches, accum = len(group), 2
    group.set_step_plan(batches, accum)
    loader = make_dataloader(group, num_workers=workers, persistent_workers=workers > 0)
    for epoch in (1, 2):
        group.set_current_epoch(epoch)
        for place, batch in enumerate(loader):
            step = (epoch - 1) * -(-batches // accum) + place // accum
            count = min(len(tags), (step * (len(tags) - 1)) // 7 + 1)  # floor(step * (8 - 1) / 7) + 1 by hand
            assert batch["captions"] == [", ".join(tags[:count])], (epoch, place)
