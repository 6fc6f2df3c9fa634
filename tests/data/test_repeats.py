"""Reg balancing (spec dataset-config §4.3) and epoch batches (§7.5)."""
import logging
import math
import random
from collections import Counter

from library.data.repeats import EpochBatches, balance_reg_images


def test_reg_balancing_round_robin(caplog):
    # 10 train x 1 repeat vs 3 reg x 2: pass 1 -> 2, 4, 6; pass 2 -> 7, 8, 9; pass 3: r1 -> 10, stop
    with caplog.at_level(logging.WARNING):
        result = balance_reg_images(10, [("r1", 2), ("r2", 2), ("r3", 2)])
    assert result.repeats == {"r1": 4, "r2": 3, "r3": 3}
    assert sum(result.repeats.values()) == 10
    assert result.unused == [] and not result.warned_unused
    assert "not used" not in caplog.text


def test_reg_images_left_unused(caplog):
    # 3 train vs 3 reg x 2 = 6: pass 1 -> r1 (2), r2 (4 >= 3) stop; r3 never used
    with caplog.at_level(logging.WARNING):
        result = balance_reg_images(3, [("r1", 2), ("r2", 2), ("r3", 2)])
    assert result.repeats == {"r1": 2, "r2": 2}
    assert result.unused == ["r3"] and result.warned_unused
    assert "some of reg images are not used" in caplog.text


def test_reg_warning_even_when_all_used():
    # 5 train vs 6 reg repeats: warned (5 < 6) but 2, 4, 6 registers all three
    result = balance_reg_images(5, [("r1", 2), ("r2", 2), ("r3", 2)])
    assert result.warned_unused and result.unused == []
    assert result.repeats == {"r1": 2, "r2": 2, "r3": 2}


def test_reg_edge_cases():
    assert balance_reg_images(6, [("r1", 3), ("r2", 3)]).repeats == {"r1": 3, "r2": 3}
    assert balance_reg_images(0, [("r1", 1)]).repeats == {}  # no train images: nothing registered
    assert balance_reg_images(5, []).repeats == {}


BUCKETS = [["a"] * 3 + ["b"] * 2, ["c"] * 4, ["d"]]


def test_batches_cut_per_bucket():
    batches = EpochBatches(BUCKETS, batch_size=2, seed=42)
    assert len(batches) == math.ceil(5 / 2) + math.ceil(4 / 2) + 1  # 3 + 2 + 1
    for epoch in (1, 2, 3):
        batches.set_epoch(epoch)
        seen = Counter()
        for i in range(len(batches)):
            keys = batches[i]
            assert 1 <= len(keys) <= 2
            bucket = batches.bucket_of(i)
            assert set(keys) <= set(BUCKETS[bucket])  # never mixes buckets
            seen.update(keys)
        assert seen == Counter(k for bucket in BUCKETS for k in bucket)


def test_order_matches_sd_scripts_global_reseeding():
    # sd-scripts: random.seed(0) shuffle at build time, then random.seed(seed + epoch) per epoch
    seed = 1234
    state = random.getstate()
    try:
        indices = [(b, i) for b, bucket in enumerate(BUCKETS) for i in range(math.ceil(len(bucket) / 2))]
        buckets = [list(b) for b in BUCKETS]
        for s in (0, seed + 1, seed + 2):
            random.seed(s)
            random.shuffle(indices)
            for bucket in buckets:
                random.shuffle(bucket)
        expected = [buckets[b][i * 2:i * 2 + 2] for b, i in indices]
    finally:
        random.setstate(state)
    batches = EpochBatches(BUCKETS, batch_size=2, seed=seed)
    batches.set_epoch(2)
    assert [batches[i] for i in range(len(batches))] == expected


def test_global_random_untouched():
    random.seed(99)
    expected = random.random()
    random.seed(99)
    batches = EpochBatches(BUCKETS, batch_size=2, seed=5)
    batches.set_epoch(3)
    assert random.random() == expected


def test_state_round_trip():
    a = EpochBatches(BUCKETS, batch_size=2, seed=7)
    a.set_epoch(4)
    b = EpochBatches(BUCKETS, batch_size=2, seed=0)
    b.load_state_dict(a.state_dict())
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    assert b.epoch == 4 and b.seed == 7
