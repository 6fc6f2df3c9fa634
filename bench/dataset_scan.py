"""Benchmark: scan, bucket and order 100,000 images with ``build_dataset_group`` (goal < 10 s, < 1 GiB).

Generates tiny PNGs (8-64 px, varied aspect; one encoded template per size, so generation is
cheap and not measured) with caption files in a few ``N_name`` folders, then measures, in a fresh
subprocess, wall time per phase and peak RSS of:
  discover (glob + caption files) -> header sizes and end-of-file checks (the "header" scan: header
  plus a few bytes at each file's end, ``library/data/integrity.py``) -> buckets -> first epoch
  (every batch's image list), and the whole ``build_dataset_group`` call at resolution 512 with buckets.
Files are in the page cache right after generation, so this is a warm-cache figure.

    python bench/dataset_scan.py [--count 100000] [--root DIR] [--keep]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOAL_SECONDS, GOAL_MIB = 10.0, 1024
FOLDERS = ("10_sks dog", "5_sks cat", "2_style", "1_misc")


def generate(root: str, count: int) -> None:
    """``count`` PNGs spread over FOLDERS, each with a ``.caption`` file (skipped if already there)."""
    from PIL import Image

    marker = os.path.join(root, f".generated_{count}")
    if os.path.exists(marker):
        return
    templates: dict[tuple[int, int], bytes] = {}
    for i in range(count):
        folder = os.path.join(root, "train", FOLDERS[i % len(FOLDERS)])
        if i < len(FOLDERS):
            os.makedirs(folder, exist_ok=True)
        size = (8 + (i * 7) % 57, 8 + (i * 13) % 57)
        if size not in templates:
            buffer = io.BytesIO()
            Image.new("RGB", size, (i % 256, 64, 128)).save(buffer, "PNG")
            templates[size] = buffer.getvalue()
        base = os.path.join(folder, f"img_{i:06d}")
        with open(base + ".png", "wb") as f:
            f.write(templates[size])
        with open(base + ".caption", "w", encoding="utf-8") as f:
            f.write(f"tag{i % 50}, tag{i % 7}, a photo number {i}\n")
    open(marker, "w").close()


def measure(root: str) -> dict:
    """Run in a fresh process: per-phase times, and the full build, with peak RSS."""
    from library.config.dataset_blueprint import dataset_params_from_args
    from library.config.options import build_parser
    from library.data.buckets import BucketSet
    from library.data.dataset import build_dataset_group
    from library.data.dataset_build import _read_missing_sizes
    from library.data.discovery import discover_dreambooth
    from library.data.repeats import EpochBatches

    args = build_parser("train_network").parse_args(
        ["--train_data_dir", os.path.join(root, "train"), "--resolution", "512", "--enable_bucket",
         "--train_batch_size", "4"])
    [params] = dataset_params_from_args(args, "train_network")
    times = {}
    start = time.perf_counter()
    infos = [info for j, s in enumerate(params.subsets) for info in discover_dreambooth(s, j).infos]
    times["discover + captions"] = time.perf_counter() - start
    start = time.perf_counter()
    _read_missing_sizes(params, infos)
    times["header sizes + end check (scan)"] = time.perf_counter() - start
    start = time.perf_counter()
    buckets = BucketSet(params.resolution, True, False, params.min_bucket_reso, params.max_bucket_reso,
                        params.bucket_reso_steps)
    for position, info in enumerate(infos):
        buckets.add_image(position, info.image_size, info.num_repeats)
    times["buckets"] = time.perf_counter() - start
    start = time.perf_counter()
    batches = EpochBatches(buckets.buckets, params.batch_size, 1234)
    batches.set_epoch(1)
    first_epoch = [batches[i] for i in range(len(batches))]
    times["first epoch order"] = time.perf_counter() - start
    del infos, buckets, batches, first_epoch
    start = time.perf_counter()
    group = build_dataset_group([params], [], seed=0, max_train_steps=1000, max_token_length=None)
    group.set_current_epoch(1)
    all_batches = [group.datasets[0].image_indices(i) for i in range(len(group))]
    times["build_dataset_group + epoch 1 (total)"] = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"images": len(group.datasets[0].images), "batches": len(all_batches), "times": times,
            "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--root", help="folder for the generated images (reused if already generated)")
    parser.add_argument("--keep", action="store_true", help="keep the generated temporary folder")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run the measurement here
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    root = args.root or tempfile.mkdtemp(prefix="dataset_scan_")
    try:
        start = time.perf_counter()
        generate(root, args.count)
        print(f"generated {args.count} images in {time.perf_counter() - start:.1f} s (not measured): {root}")
        out = subprocess.run([sys.executable, __file__, "--measure", root], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = result["times"]["build_dataset_group + epoch 1 (total)"]
    print(f"\n{result['images']} images, {result['batches']} batches of 4, resolution 512, buckets on\n")
    print("| phase | seconds |\n|---|---|")
    for phase, seconds in result["times"].items():
        print(f"| {phase} | {seconds:.2f} |")
    print(f"| peak RSS (MiB, whole process) | {result['peak_mib']:.0f} |")
    verdict = "meets" if total < GOAL_SECONDS and result["peak_mib"] < GOAL_MIB else "MISSES"
    print(f"\ngoal: < {GOAL_SECONDS:.0f} s and < {GOAL_MIB} MiB -> {verdict} "
          f"({total:.2f} s, {result['peak_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
