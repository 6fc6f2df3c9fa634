#!/usr/bin/env python
"""Where a tiny LoRA run's wall time goes (issue 18 item 3): imports, option checks, dataset scan, model load,
latent caching, network set-up, data-loader start, first step, later steps, saves and receipts.

    python bench/fixed_costs.py [--steps 12] [--batch 2] [--resolution 64] [--workers 8] [--cache_latents]

Runs train_network.py's own runner in this process on a tiny SD1 (written by tools/make_tiny_model.py) and a
shapes dataset, timing the runner's steps by wrapping them (nothing in the project is changed). Prints a markdown
table; the ``--threads`` default is 1 (``OMP_NUM_THREADS``), as for every benchmark on this 2-core machine.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMES: dict[str, list[float]] = defaultdict(list)


def _timed(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``TIMES[label]``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            TIMES[label].append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def _timed_loader(run_common) -> None:
    """The loader factory's first batch of each epoch: worker start-up plus the first batch's decode."""
    original = run_common.make_loader_factory

    def factory(*a, **k):
        make = original(*a, **k)

        def loader(epoch: int, skip: int):
            t0 = time.perf_counter()
            for i, batch in enumerate(make(epoch, skip)):
                if i == 0:
                    TIMES["data loader start + first batch"].append(time.perf_counter() - t0)
                yield batch

        return loader

    run_common.make_loader_factory = factory


def instrument() -> None:
    from library.training.extras import receipts
    from library.training.loop import checkpointing, train_loop
    from library.training.runners import recipe, run_common, run_network

    _timed(recipe, "_options", "option checks + preflight")
    _timed(recipe, "build_data", "dataset scan")
    _timed(recipe, "load_base_models", "model load")
    _timed(recipe, "cache_latents_if_asked", "latent caching")
    _timed(run_network, "_apply_network", "network set-up")
    _timed(train_loop, "_forward_backward", "step (forward + backward)")
    _timed(checkpointing.Checkpointer, "_model", "saves (model files)")
    _timed(receipts.ReceiptWriter, "after_save", "receipts")
    _timed_loader(run_common)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8, help="--max_data_loader_n_workers (default 8, as upstream)")
    ap.add_argument("--cache_latents", action="store_true")
    ap.add_argument("--threads", default="1")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", a.threads)
    work = Path(tempfile.mkdtemp(prefix="fixed_costs_"))
    t_start = time.perf_counter()
    import train_network  # the scripts' import cost: options, logging, torch
    t_import = time.perf_counter() - t_start
    from tools.make_shapes_dataset import main as make_shapes
    from tools.make_tiny_model import write_tiny_model

    model = write_tiny_model("sd1", work / "tiny", formats=("safetensors",))["safetensors"]
    make_shapes(["--out", str(work / "data"), "--n", "24", "--console_log_level", "WARNING"])
    instrument()
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(work / "data"),
            "--output_dir", str(work / "out"), "--output_name", "lora", "--resolution", str(a.resolution),
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", str(2 * a.resolution),
            "--train_batch_size", str(a.batch), "--max_train_steps", str(a.steps), "--network_module",
            "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3", "--seed", "1",
            "--save_every_n_steps", str(max(1, a.steps // 2)), "--max_data_loader_n_workers", str(a.workers),
            "--console_log_level", "WARNING"] + (["--cache_latents"] if a.cache_latents else [])
    t0 = time.perf_counter()
    train_network.main(argv)
    run_wall = time.perf_counter() - t0
    _report(a, t_import, run_wall)


def _report(a, t_import: float, run_wall: float) -> None:
    steps = TIMES["step (forward + backward)"]
    rows = [("imports (train_network, torch)", t_import)]
    rows += [(label, sum(values)) for label, values in TIMES.items() if label != "step (forward + backward)"]
    rows += [("first step", steps[0]), (f"later steps ({len(steps) - 1}, each {_mean(steps[1:]):.3f} s)",
                                        sum(steps[1:]))]
    counted = sum(t for label, t in rows[1:])
    rows.append(("everything else (optimizer, logging, loop)", run_wall - counted))
    print(f"### Tiny SD1 LoRA, {a.steps} steps, batch {a.batch}, {a.resolution} px, {a.workers} loader workers"
          f"{', cached latents' if a.cache_latents else ''}\n")
    print("| phase | s |\n|---|---|")
    for label, secs in rows:
        print(f"| {label} | {secs:.2f} |")
    print(f"| **run (after imports)** | **{run_wall:.2f}** |")
    print(f"\nfirst step / mean later step: {steps[0] / max(_mean(steps[1:]), 1e-9):.1f}x")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


if __name__ == "__main__":
    main()
