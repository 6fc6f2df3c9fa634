#!/usr/bin/env python
"""GPU training and generation speed on real-size random-weight models (issue 16), one results file.

    python bench/gpu_bench.py --out DIR            # on a CUDA GPU: real-size SD 1.5 and SDXL
    python bench/gpu_bench.py --out DIR --cpu-smoke   # the same code paths on CPU, tiny models, one step each

Training (each through the real trainer, in-process): SD 1.5 LoRA at 512 px, dim 32, bf16, cached latents,
batch 1 / 4 / 8; SDXL LoRA at 1024 px, dim 32, batch 1, cached latents and text-encoder outputs, gradient
checkpointing, with and without --fp8_base. Per run: s/step (median of the steps after the warm-up, timed at
the trainer's own step boundary), images/s, MFU (U-Net FLOPs from torch's FLOP counter on the real config,
a step = 3 x forward, over the GPU's dense bf16 peak), peak VRAM allocated and reserved. Generation: our
pipeline vs diffusers' StableDiffusionPipeline, SD 1.5 at 512 px, 30 steps, batch 4, same scheduler, seeds
and start latents, fp16 (bench/gen.py's comparison). Writes DIR/gpu_bench.md (tables) and
DIR/gpu_bench.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# dense bf16 tensor-core peak, FLOP/s, by the name torch reports (spec sheets)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
PROFILED = ("sd1_b8", "sdxl_b1")  # the runs with a speed or memory target
TARGETS = {"sd1_b8": "MFU >= 45 %", "sdxl_b1": "peak allocated <= 8 GiB", "sdxl_b1_fp8": "peak allocated <= 8 GiB",
           "gen": ">= 1.0x diffusers"}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def make_data(root: Path, size: int, n: int = 8) -> Path:
    """n images with captions in ``<root>/100_sks`` (repeats 100: steps never run out of data)."""
    folder = root / "100_sks"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(a).resize((size, size), Image.Resampling.NEAREST).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks, number {i}", encoding="utf-8")
    return root


PROFILE_STEPS = 2  # steps recorded by torch.profiler after the timed ones (not part of the timing)


class StepClock:
    """Times each optimizer step at the trainer's own step boundary (ThroughputWatch.step_done); with
    ``profile_after`` steps timed, the next PROFILE_STEPS steps are recorded by torch.profiler."""

    def __init__(self, profile_after: int | None = None):
        self.stamps: list[float] = []
        self.profiler = None
        if profile_after is not None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=acts, schedule=torch.profiler.schedule(wait=profile_after, warmup=1,
                                                                  active=PROFILE_STEPS, repeat=1))

    def __enter__(self):
        from library.training.loop import throughput

        self._cls = throughput.ThroughputWatch
        self._orig = self._cls.step_done
        clock = self

        def step_done(watch, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            clock.stamps.append(time.perf_counter())
            if clock.profiler is not None:
                clock.profiler.step()
            return clock._orig(watch, *a, **k)

        self._cls.step_done = step_done
        if self.profiler is not None:
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self._cls.step_done = self._orig
        if self.profiler is not None:
            self.profiler.__exit__(*exc)

    def median_step(self, warmup: int, steps: int) -> float:
        times = [b - a for a, b in zip(self.stamps, self.stamps[1:])][max(0, warmup - 1):][:steps]
        return statistics.median(times) if times else float("nan")

    def profile_table(self, rows: int = 15) -> str:
        """The recorded steps' top operators by self time on the device (CPU time without CUDA)."""
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return self.profiler.key_averages().table(sort_by=key, row_limit=rows)


def train_run(name: str, family: str, model: Path, data: Path, out: Path, batch: int, size: int, steps: int,
              warmup: int, options: list[str], device: torch.device, profile: bool = False) -> dict:
    import sdxl_train_network
    import train_network

    script = sdxl_train_network if family == "sdxl" else train_network
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", str(size),
            "--output_dir", str(out / name), "--output_name", name, "--network_module", "networks.lora",
            "--network_dim", "32", "--network_alpha", "16", "--train_batch_size", str(batch),
            "--max_train_steps", str(warmup + steps + (PROFILE_STEPS + 1 if profile else 0)), "--learning_rate", "1e-4", "--seed", "1",
            "--max_data_loader_n_workers", "2", "--cache_latents", "--console_log_simple", "--sdpa", *options]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with StepClock(profile_after=warmup + steps if profile else None) as clock:
        script.main(argv)
    s_step = clock.median_step(warmup, steps)
    latent = size // 8
    fwd = _forward_flops(family, batch, latent)
    peak = peak_flops(device)
    row = {"name": name, "family": family, "batch": batch, "size": size, "options": " ".join(options),
           "s_per_step": s_step, "images_per_s": batch / s_step, "unet_forward_tflop": fwd / 1e12,
           "mfu": (3 * fwd / s_step / peak) if peak else None, "steps_timed": steps}
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if profile:
        row["profile"] = clock.profile_table()
    return row


def _forward_flops(family: str, batch: int, latent: int) -> int:
    from library.models.real_size import unet_forward_flops

    return unet_forward_flops(family, batch, (latent, latent))


def gen_run(folder: Path, device: torch.device, smoke: bool) -> list[dict]:
    from bench.gen import bench_family

    a = argparse.Namespace(size=64 if smoke else 512, steps=2 if smoke else 30, batch=4, repeats=1 if smoke else 3,
                           sampler="euler_a")
    dtype = torch.float32 if smoke else torch.float16
    rows = bench_family("sd1", folder, a, device, dtype=dtype)
    return [{"name": f"gen {name}", "seconds_per_batch": secs, "images_per_s": ips} for _, name, secs, ips in rows]


def write_results(out: Path, rows: list[dict], gen_rows: list[dict], meta: dict) -> None:
    lines = [f"# GPU benchmark ({meta['device']}, {meta['date']})", "",
             f"torch {meta['torch']}, smoke: {meta['smoke']}"
             + (" (tiny models train at 64 px; the FLOP column is the real config's at that size)" if meta["smoke"]
                else ""), "",
             "| run | batch | px | options | s/step | images/s | U-Net fwd TFLOP | MFU | peak alloc GiB | "
             "peak reserved GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {r['name']} | {r['batch']} | {r['size']} | {r['options']} | {r['s_per_step']:.4f} | "
                     f"{r['images_per_s']:.2f} | {r['unet_forward_tflop']:.2f} | {mfu} | "
                     f"{r.get('peak_allocated_gib', float('nan')):.2f} | {r.get('peak_reserved_gib', float('nan')):.2f} |")
    lines += ["", "| generation | s / batch of 4 | images/s |", "|---|---|---|"]
    lines += [f"| {g['name']} | {g['seconds_per_batch']:.3f} | {g['images_per_s']:.2f} |" for g in gen_rows]
    if len(gen_rows) == 2:
        lines.append(f"\nours / diffusers images/s: {gen_rows[0]['images_per_s'] / gen_rows[1]['images_per_s']:.3f}")
    lines += ["", "MFU = 3 x U-Net forward FLOPs per step (torch's FLOP counter on the real config) / s per step / "
              f"the GPU's dense bf16 peak ({meta.get('peak_tflops') or 'n/a'} TFLOP/s). The model-FLOP convention: "
              "a LoRA step does no weight-gradient work for the frozen U-Net, and checkpointing recomputes the forward.",
              "", "targets: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items())]
    for r in rows:
        if r.get("profile"):
            lines += ["", f"## torch.profiler: {r['name']}, {PROFILE_STEPS} steps after the timed ones", "",
                      "```", r["profile"].rstrip(), "```"]
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "train": rows, "gen": gen_rows}, indent=1),
                                        encoding="utf-8")
    print("\n".join(lines))


def build_models(family: str, root: Path, device: torch.device, smoke: bool) -> Path:
    """A Diffusers folder: the real-size random model (GPU) or the tiny test model (smoke)."""
    from library.models.saving import save_diffusers

    if smoke:
        from tools.make_tiny_model import write_tiny_model

        return write_tiny_model(family, root, formats=("diffusers",))["diffusers"]
    from library.models.real_size import build_random_models

    t0 = time.perf_counter()
    models = build_random_models(family, device=device, dtype=torch.float16)
    folder = root / f"{family}-real"
    save_diffusers(models, str(folder), dtype=torch.float16)
    del models
    torch.cuda.empty_cache()
    print(f"built and saved a random real-size {family} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_bench.md and gpu_bench.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, one step each")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    a = p.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)
    smoke = a.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not smoke:
        sys.exit("no CUDA GPU here: use --cpu-smoke to check the code paths on the CPU")
    steps, warmup = (1, 1) if smoke else (a.steps, a.warmup)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = ["--mixed_precision", "bf16"]
    sdxl = [*bf16, "--network_train_unet_only", "--cache_text_encoder_outputs", "--gradient_checkpointing"]
    runs = [("sd1_b1", "sd1", 1, bf16), ("sd1_b4", "sd1", 4, bf16), ("sd1_b8", "sd1", 8, bf16),
            ("sdxl_b1", "sdxl", 1, sdxl), ("sdxl_b1_fp8", "sdxl", 1, [*sdxl, "--fp8_base"])]
    if a.only:
        runs = [r for r in runs if r[0] in a.only.split(",")]
    rows, gen_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family in dict.fromkeys(r[1] for r in runs):
            size = 64 if smoke else (1024 if family == "sdxl" else 512)
            model = build_models(family, tmp / "models", device, smoke)
            data = make_data(tmp / f"data_{family}", size)
            for name, fam, batch, options in runs:
                if fam == family:
                    rows.append(train_run(name, family, model, data, tmp / "out", batch, size, steps, warmup,
                                          options, device, profile=name in PROFILED))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
            if family == "sd1":
                gen_rows = gen_run(model, device, smoke)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "smoke": smoke,
            "peak_tflops": (peak_flops(device) or 0) / 1e12 or None}
    write_results(out, rows, gen_rows, meta)


if __name__ == "__main__":
    main()
