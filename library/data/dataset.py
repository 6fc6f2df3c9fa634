"""The training dataset every trainer consumes: a group of datasets whose item is a whole batch.

spec dataset-config §1 (datasets and seed), §7.5 (batches and epochs), §11 (batch dictionary).

* ``build_dataset_group(params, tokenizers, seed=...)`` builds every dataset and checks every image
  up front (``scan``), so a broken file stops the run before training, not hours in.
* ``DatasetGroup[i]`` is batch ``i`` of the current epoch (a dict, spec §11); ``set_current_epoch`` /
  ``set_current_step`` move the shared position. The position lives in a shared-memory tensor, so
  DataLoader workers (persistent or not) see the trainer's updates without sd-scripts' collator trick.
* Determinism (see ``train_dataset``): a batch is a pure function of (seed, epoch, index), so any
  number of workers and a resume mid-epoch give bit-identical batches. The global step that token warmup
  reads is derived the same way: the training loader's sampler hands each batch its place in this process's
  epoch, and ``set_step_plan`` says how places map to optimizer steps (sd-scripts reads a shared counter the
  loop bumps, which prefetching workers see late).
* A ``UserError`` in a DataLoader worker (a file that broke after the scan, say) reaches the main
  process as itself, so the user sees the same one ``error:`` line as with ``num_workers=0``; torch
  would re-raise it wrapped in the worker's traceback text (``WorkerFailure``, ``BatchLoader``).
* ``make_dataloader`` uses ``shuffle=False``: sd-scripts' DataLoader shuffles the batch list with
  the global RNG (``shuffle=True``) on top of the dataset's own per-epoch shuffle; here the group's
  per-epoch shuffle (seeded by seed + epoch, §7.5) is the only one, which keeps the order reproducible.
"""
from __future__ import annotations

import bisect
import logging
import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from library.config.dataset_blueprint import DatasetParams
from library.data.dataset_build import build_dataset
from library.data.image_info import read_sizes
from library.data.images import scan_images
from library.data.latent_cache import check_latent_cacheable
from library.data.te_cache import caption_randomness, check_te_cacheable
from library.data.train_dataset import ItemContext, TrainDataset
from library.data.validation_split import wants_validation
from library.errors import UserError

logger = logging.getLogger(__name__)

SCAN_MODES = ("header", "full", "none")


def dataset_seed(seed: int | None) -> int:
    """sd-scripts' dataset seed: ``randint(0, 2**31)`` right after ``set_seed(--seed)`` (spec §1)."""
    return (random.Random(seed) if seed is not None else random.SystemRandom()).randint(0, 2**31)


class DatasetGroup(Dataset):
    """Concatenated datasets; item ``i`` is one batch dict (spec §11), never mixing buckets."""

    def __init__(self, datasets: Sequence[TrainDataset], tokenizers: Sequence, *, seed: int, max_train_steps: int,
                 max_token_length: int | None, debug_dataset: bool = False) -> None:
        self.datasets = list(datasets)
        self.tokenizers = list(tokenizers)
        self.seed = seed  # the dataset seed (``dataset_seed(--seed)``)
        self.max_token_length = max_token_length
        self.debug_dataset = debug_dataset
        self.replacements: dict[str, object] = {}
        self.latent_factor = 8  # pixels per latent cell: set from the VAE (2 ** (levels - 1)) once it is loaded
        # epoch (1-based once training starts), global step, max_train_steps: shared with workers
        self._position = torch.tensor([0, 0, max_train_steps], dtype=torch.int64).share_memory_()
        self._step_plan: tuple[int, int] | None = None  # (batches per epoch per process, accumulation steps)
        self._ends = []
        total = 0
        for dataset in self.datasets:
            total += len(dataset)
            self._ends.append(total)

    # ---- torch Dataset
    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Batch ``index`` of the current epoch; ``(index, place)`` from the training sampler also says where
        the batch falls in this process's epoch, which fixes the global step token warmup reads."""
        index, place = index if isinstance(index, tuple) else (index, None)
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range (0..{len(self) - 1})")
        which = bisect.bisect_right(self._ends, index)
        local = index - (self._ends[which - 1] if which else 0)
        epoch, step, max_steps = self._position.tolist()
        if place is not None and self._step_plan is not None:
            step = self.step_of(epoch, place)
        ctx = ItemContext(epoch, step, max_steps, self.tokenizers, self.max_token_length, self.replacements,
                          self.debug_dataset, self.latent_factor)
        try:
            return self.datasets[which].get_batch(local, ctx)
        except UserError as e:
            if get_worker_info() is None:
                raise
            return WorkerFailure(e)  # as data: BatchLoader raises it in the main process

    # ---- position (spec §7.5)
    @property
    def current_epoch(self) -> int:
        return int(self._position[0])

    @property
    def current_step(self) -> int:
        return int(self._position[1])

    def set_current_epoch(self, epoch: int) -> None:
        """Set the 1-based epoch; the batch order of that epoch is used from the next item on."""
        self._position[0] = epoch
        for dataset in self.datasets:
            dataset.sync_epoch(epoch)

    def set_current_step(self, step: int) -> None:
        """Global step for token warmup (read when an item is fetched; approximate with workers)."""
        self._position[1] = step

    def set_step_plan(self, batches_per_epoch: int, grad_accum: int) -> None:
        """How the training loop counts optimizer steps: every ``grad_accum`` batches of a process's epoch and
        once more for a last partial group (``library/training/loop/train_loop.py``)."""
        if batches_per_epoch < 1 or grad_accum < 1:
            raise ValueError(f"step plan needs positive counts, got {batches_per_epoch}, {grad_accum}")
        self._step_plan = (batches_per_epoch, grad_accum)

    def step_of(self, epoch: int, place: int) -> int:
        return step_of(self._step_plan, epoch, place)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Total steps, for ``token_warmup_step`` < 1 given as a fraction (spec §8 step 4)."""
        self._position[2] = max_train_steps

    def state_dict(self) -> dict:
        """Position for resume; the order of any epoch is rebuilt from the seed."""
        epoch, step, max_steps = self._position.tolist()
        return {"seed": self.seed, "epoch": epoch, "step": step, "max_train_steps": max_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore seed and position; batch ``i`` of the epoch is then what it was before."""
        self.seed = int(state["seed"])
        for dataset in self.datasets:
            dataset.seed = self.seed
            dataset.batches.load_state_dict({"seed": self.seed, "epoch": int(state["epoch"])})
        self._position[:] = torch.tensor([int(state["epoch"]), int(state.get("step", 0)),
                                          int(state.get("max_train_steps", self._position[2]))])

    # ---- checks and options
    def scan(self, mode: str = "header") -> None:
        """Check every image training will decode (spec: fail before training, not during it).

        ``"header"``: each image header parses and the file ends where its format says (sizes read
        while building count; cheap, seconds for 100,000 files). ``"full"`` (``--verify_images``):
        every file is decoded as training will (also finds corrupt data mid-file; slow).
        Images whose latents come from a cache are not decoded in training and are not checked.
        """
        if mode not in SCAN_MODES:
            raise ValueError(f"scan must be one of {SCAN_MODES}, not {mode!r}")
        if mode == "none":
            return
        for dataset in self.datasets:
            paths = {i.path for i in dataset.images if not i.has_cached_latents}
            paths |= {i.cond_path for i in dataset.images if i.cond_path is not None}
            if mode == "full":
                logger.info("decoding %d images of dataset %d to verify them", len(paths), dataset.index)
                scan_images(sorted(paths))
            else:
                read_sizes(sorted(paths - dataset.verified_paths))
                dataset.verified_paths = set()  # checked now; the set only saves work once

    def add_replacement(self, source: str, target) -> None:
        """Textual Inversion caption replacement (spec §8 step 6); ``""`` replaces the whole caption."""
        self.replacements[source] = target

    def verify_bucket_reso_steps(self, steps: int) -> None:
        """SDXL needs bucket sides divisible by 32 (spec cli-options §3 ``--bucket_reso_steps``)."""
        for dataset in self.datasets:
            if dataset.bucketed and dataset.params.bucket_reso_steps % steps != 0:
                raise UserError(f"bucket_reso_steps {dataset.params.bucket_reso_steps} must be divisible by "
                                f"{steps} for this model")

    def is_latent_cacheable(self) -> bool:
        return not any(s.color_aug or s.random_crop for d in self.datasets for s in d.subsets)

    def is_text_encoder_output_cacheable(self) -> bool:
        return not any(caption_randomness(s) for d in self.datasets for s in d.subsets)

    # ---- numbers and metadata (spec file-formats §b.1)
    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def bucket_info(self) -> dict | None:
        """``ss_bucket_info`` (one dataset, no ``--dataset_config``): the first dataset's (§7.5)."""
        return self.datasets[0].bucket_info() if self.datasets else None

    def image_infos(self) -> Iterator:
        for dataset in self.datasets:
            yield from dataset.images


def build_dataset_group(params: list[DatasetParams], tokenizers: list, *, seed: int | None, max_train_steps: int,
                        max_token_length: int | None, debug_dataset: bool = False, te_cache_expected: bool = False,
                        latents_cache_expected: bool = False, scan: str | bool = "header",
                        part: str = "train") -> DatasetGroup | None:
    """Build every dataset of a run (spec dataset-config §1-§7) and check its images.

    ``seed`` is the run's ``--seed``; the dataset seed is derived as sd-scripts does (``dataset_seed``).
    ``max_token_length`` (``--max_token_length``: None, 150 or 225) overrides the params' copy.
    ``te_cache_expected``/``latents_cache_expected`` refuse settings those caches cannot honour now,
    before any model is loaded. ``scan``: "header" (default), "full", or "none"/False.
    ``part``: "train" (default) or "validation" (the held-out images of ``validation_split``; None when
    no subset holds any out).
    """
    scan_mode = {True: "header", False: "none"}.get(scan, scan) if isinstance(scan, bool) else scan
    if scan_mode not in SCAN_MODES:
        raise ValueError(f"scan must be one of {SCAN_MODES}, not {scan!r}")
    s = dataset_seed(seed)
    datasets = []
    for i, p in enumerate(params):
        if part == "validation" and not wants_validation(p.subsets):
            continue
        logger.info("dataset %d: %s style, %d subsets (%s)", i, p.style, len(p.subsets), part)
        dataset = build_dataset(p, i, s, part=part, run_seed=seed)
        if dataset is not None:
            datasets.append(dataset)
    if part == "validation" and not datasets:
        return None
    if not any(d.images for d in datasets):
        raise UserError("no training images found in any dataset: check the folders and the dataset config")
    for dataset in datasets:
        if te_cache_expected:
            check_te_cacheable(dataset.subsets)
        if latents_cache_expected:
            check_latent_cacheable(dataset.subsets)
    debug = debug_dataset or any(p.debug_dataset for p in params)
    group = DatasetGroup(datasets, tokenizers, seed=s, max_train_steps=max_train_steps,
                         max_token_length=max_token_length, debug_dataset=debug)
    group.scan(scan_mode)
    return group


def scan_mode(verify_images: bool) -> str:
    """The image scan a run asks for: ``"full"`` with ``--verify_images``, else ``"header"``."""
    return "full" if verify_images else "header"


class WorkerFailure:
    """A ``UserError`` raised in a DataLoader worker, sent to the main process as a batch would be."""

    def __init__(self, error: UserError) -> None:
        self.error = error


def step_of(step_plan: tuple[int, int], epoch: int, place: int) -> int:
    """Optimizer steps finished before a process's batch ``place`` of 1-based ``epoch`` is used (the step
    sd-scripts' loop has counted when it fetches that batch), given (batches per epoch, accumulation steps)."""
    batches, accum = step_plan
    return max(epoch - 1, 0) * -(-batches // accum) + place // accum


class BatchLoader(DataLoader):
    """A DataLoader that raises a worker's ``UserError`` in the main process as the error itself."""

    def __iter__(self) -> Iterator:
        for batch in super().__iter__():
            if isinstance(batch, WorkerFailure):
                raise batch.error
            yield batch


def collate_batches(items) -> dict:
    """The DataLoader's collate: an item already is a batch, so return it (list of one or the dict)."""
    if isinstance(items, (dict, WorkerFailure)):
        return items
    if len(items) != 1:
        raise ValueError(f"expected one batch per DataLoader step, got {len(items)}")
    return items[0]


class EpochSampler(Sampler):
    """This process's batch indices in order (the group shuffles); optionally skipping the first few once.

    With several processes, process p takes batches p, p+N, p+2N, ...; the shorter shares wrap
    around to the first batches so every process runs the same number of steps (as accelerate's
    ``even_batches``).
    """

    def __init__(self, group: DatasetGroup, process_index: int = 0, num_processes: int = 1) -> None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} not in 0..{num_processes - 1}")
        self.group = group
        self.process_index = process_index
        self.num_processes = num_processes
        self._skip = 0

    def skip_first(self, count: int) -> None:
        """The next iteration starts at this process's batch ``count`` (resume mid-epoch cheaply)."""
        self._skip = count

    def _indices(self) -> list[int]:
        total = len(self.group)
        if total == 0:
            return []
        return [(self.process_index + k * self.num_processes) % total for k in range(len(self))]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(batch index, place in this process's epoch): the place fixes the batch's global step."""
        start, self._skip = self._skip, 0
        return iter([(index, place) for place, index in enumerate(self._indices()) if place >= start])

    def __len__(self) -> int:
        return -(-len(self.group) // self.num_processes)


def make_dataloader(group: DatasetGroup, num_workers: int = 0, persistent_workers: bool = False, *,
                    epoch: int | None = None, skip: int = 0, process_index: int = 0,
                    num_processes: int = 1) -> DataLoader:
    """DataLoader over whole batches: batch_size=1, ``shuffle=False`` (module doc), ``collate_batches``.

    ``epoch`` (1-based) is set on the group first when given; ``skip`` drops this process's first
    batches of the first iteration (resume); ``process_index``/``num_processes`` shard the batches.
    """
    if epoch is not None:
        group.set_current_epoch(epoch)
    sampler = EpochSampler(group, process_index, num_processes)
    sampler.skip_first(skip)
    return BatchLoader(group, batch_size=1, sampler=sampler, collate_fn=collate_batches,
                      num_workers=num_workers, persistent_workers=persistent_workers and num_workers > 0)
