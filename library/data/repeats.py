"""Repeats and epochs: regularization-image balancing and the per-epoch batch order.

spec dataset-config §4.3 (reg balancing) and §7.5 (batches per bucket, shuffle per epoch).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Sequence

logger = logging.getLogger(__name__)


@dataclass
class RegBalance:
    """Result of reg balancing: registered reg images in order, with their final repeats."""

    repeats: dict[str, int]
    unused: list[str]
    warned_unused: bool  # sd-scripts' "some of reg images are not used" condition


def balance_reg_images(num_train_images: int, reg_images: Sequence[tuple[str, int]]) -> RegBalance:
    """Register reg images round-robin until their repeats reach the train count (spec §4.3).

    ``reg_images`` are (key, num_repeats) in subset and file order; ``num_train_images`` is the
    sum of repeats x images over the train subsets.
    """
    num_reg_images = sum(repeats for _, repeats in reg_images)
    warned = num_train_images < num_reg_images
    if warned:  # sd-scripts' condition: it may warn even when every reg image ends up used
        logger.warning("some of reg images are not used")
    if num_reg_images == 0:
        logger.warning("no regularization images")
        return RegBalance({}, [], warned)
    registered: dict[str, int] = {}
    total = 0
    first_pass = True
    while total < num_train_images:
        for key, repeats in reg_images:
            if first_pass:  # each image with its own repeats, stopping as soon as the total is reached
                registered[key] = repeats
                total += repeats
            else:  # later passes: one more repeat per registered image, in order
                registered[key] += 1
                total += 1
            if total >= num_train_images:
                break
        first_pass = False
    unused = [key for key, _ in reg_images if key not in registered]
    return RegBalance(registered, unused, warned)


@dataclass(frozen=True)
class BatchIndex:
    """One dataset item: a slice of one bucket (sd-scripts' BucketBatchIndex)."""

    bucket_index: int
    batch_size: int
    batch_index: int


class EpochBatches:
    """Batches cut from buckets and reshuffled at every epoch change (spec dataset-config §7.5).

    Deviation from sd-scripts: it reseeds Python's global ``random`` with ``seed + epoch`` and
    shuffles with it, which also resets every other user of the global generator (caption
    shuffles, flips, crops). Here a dedicated ``random.Random(seed + epoch)`` performs the same
    shuffles, so the batch order is the same as sd-scripts' for the same seed while nothing
    else is disturbed.
    """

    def __init__(self, buckets: Sequence[Sequence[str]], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._initial = [list(bucket) for bucket in buckets]
        self.batch_size = batch_size
        self.seed = 0
        self._reset()
        self.seed = seed  # sd-scripts sets the dataset seed after the initial (seed 0) shuffle

    def _reset(self) -> None:
        self.epoch = 0
        self.buckets = [list(bucket) for bucket in self._initial]
        self.indices = [BatchIndex(b, self.batch_size, i)
                        for b, bucket in enumerate(self.buckets)
                        for i in range(math.ceil(len(bucket) / self.batch_size))]
        self._shuffle()

    def _shuffle(self) -> None:
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(self.indices)
        for bucket in self.buckets:
            rng.shuffle(bucket)

    def set_epoch(self, epoch: int) -> None:
        """Advance to ``epoch`` (1-based), shuffling once per epoch passed; going back only relabels."""
        if epoch > self.epoch:
            for _ in range(epoch - self.epoch):  # cumulative, as sd-scripts' set_current_epoch
                self.epoch += 1
                self._shuffle()
        elif epoch < self.epoch:
            logger.warning(f"epoch is not incremented. current_epoch: {self.epoch}, epoch: {epoch}")
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> list[str]:
        """The image keys of batch ``index`` (never mixes buckets; the last may be short)."""
        item = self.indices[index]
        start = item.batch_index * item.batch_size
        return self.buckets[item.bucket_index][start:start + item.batch_size]

    def bucket_of(self, index: int) -> int:
        """Bucket index of batch ``index``."""
        return self.indices[index].bucket_index

    def state_dict(self) -> dict:
        """Seed and epoch; the order is rebuilt by replaying the shuffles."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the order of ``state["epoch"]`` from the initial buckets."""
        seed = self.seed
        self.seed = 0
        self._reset()
        self.seed = int(state.get("seed", seed))
        self.set_epoch(int(state["epoch"]))
