"""Decode images (optionally on a thread pool) and group the readable ones into batches.

Shared by the WD14 tagger and the BLIP/GIT captioners. Threads instead of sd-scripts' DataLoader
processes: PIL decoding releases the GIL, and nothing has to be pickled between processes; the chunk
bounds how many decoded images wait in memory.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

Loaded = tuple[Path, Any]  # (path, decoded image or None when unreadable)


def load_in_order(paths: list[Path], load: Callable[[Path], Loaded], workers: int | None,
                  chunk: int) -> Iterator[Loaded]:
    """``load(path)`` for every path, in path order; ``workers`` threads when given."""
    if workers is None:
        yield from (load(p) for p in paths)
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), chunk):
            yield from pool.map(load, paths[start:start + chunk])


def readable_batches(loaded: Iterable[Loaded], batch_size: int) -> Iterator[list[tuple[Path, Any]]]:
    """Readable images in lists of ``batch_size`` (the last one may be shorter); unreadable ones dropped."""
    batch: list[tuple[Path, Any]] = []
    for path, image in loaded:
        if image is None:
            continue
        batch.append((path, image))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
