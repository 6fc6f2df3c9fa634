"""Images per second for the progress bar, and one warning when steps become much slower (docs §6).

A step's time runs from the end of the previous step's side jobs (logging, samples, saves, validation)
to the end of its optimizer step, so sampling or saving never counts as a slow step. The time spent
waiting for the data loader inside a step is measured separately. When the step time stays above
``factor`` x the running median of the normal steps for ``streak`` steps in a row, one warning names the
likely causes with the measured share of data loading.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from typing import Callable, Iterable, Iterator, Optional, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ThroughputWatch:
    """Step timing: images/s, data-loading share, and the slow-down warning (given once per run)."""

    def __init__(self, factor: float = 5.0, streak: int = 20, window: int = 200, min_history: int = 10,
                 clock: Callable[[], float] = time.perf_counter):
        self.factor, self.streak, self.min_history, self.clock = factor, streak, min_history, clock
        self.history: deque[float] = deque(maxlen=window)  # times of normal (not slow) steps
        self.slow: list[tuple[float, float]] = []  # (step time, data time) of the current slow streak
        self.warned = False
        self.images_per_second = 0.0
        self._start = clock()
        self._data_time = 0.0
        self._images = 0

    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable``, adding the time spent waiting for each item to the current step."""
        it = iter(iterable)
        while True:
            t0 = self.clock()
            try:
                item = next(it)
            except StopIteration:
                return
            self._data_time += self.clock() - t0
            yield item

    def add_images(self, count: int) -> None:
        self._images += count

    def mark(self) -> None:
        """Side jobs are over: the next step's time starts now."""
        self._start = self.clock()
        self._data_time, self._images = 0.0, 0

    def step_done(self) -> Optional[str]:
        """Record the step that just finished; return the warning when it is due (once)."""
        step_time, data_time = max(self.clock() - self._start, 1e-9), self._data_time
        rate = self._images / step_time
        # smoothed like tqdm's rate: the bar should not flicker with each step
        self.images_per_second = rate if self.images_per_second == 0 else 0.9 * self.images_per_second + 0.1 * rate
        message = self._observe(step_time, data_time)
        self.mark()
        return message

    def _observe(self, step_time: float, data_time: float) -> Optional[str]:
        if len(self.history) < self.min_history:
            self.history.append(step_time)
            return None
        median = statistics.median(self.history)
        if step_time <= self.factor * median:
            self.history.append(step_time)
            self.slow = []
            return None
        self.slow.append((step_time, data_time))
        if len(self.slow) < self.streak or self.warned:
            return None
        self.warned = True
        return slow_down_message(median, self.slow, self.factor)


def slow_down_message(median: float, slow: list[tuple[float, float]], factor: float) -> str:
    """One warning line: how slow, the data-loading share, and the likely cause first."""
    total = sum(t for t, _ in slow)
    share = sum(d for _, d in slow) / total if total else 0.0
    mean = total / len(slow)
    loader = ("a starving data loader: raise --max_data_loader_n_workers, add --persistent_data_loader_workers "
              "or --cache_latents")
    memory = ("accelerator memory spilling into host memory (e.g. the NVIDIA driver's system-memory fallback): "
              "lower the batch size or resolution, or use --gradient_checkpointing")
    causes = [loader, memory] if share >= 0.5 else [memory, loader]
    return (f"the last {len(slow)} steps took {mean:.3f}s on average, over {factor:g}x the running median "
            f"{median:.3f}s; data loading was {share:.0%} of that time. Likely causes: {causes[0]}; or {causes[1]}")


def batch_images(batch: dict) -> int:
    """Number of samples in a batch dictionary (spec dataset-config §11)."""
    for key in ("latents", "images"):
        value = batch.get(key)
        if value is not None and hasattr(value, "shape"):
            return int(value.shape[0])
    return len(batch.get("captions") or [])
