"""bench/gpu.sh cannot rot: its CPU smoke runs the GPU script's code paths (the GPU tests' code, every
benchmark run through the real trainers, the profiler, the generation comparison) on the tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = {"sd1_b1", "sd1_b4", "sd1_b8", "sdxl_b1", "sdxl_b1_fp8"}


def test_gpu_script_cpu_smoke(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "bench/gpu.sh", "--cpu-smoke", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in (out / "gpu_tests.log").read_text()
    results = json.loads((out / "gpu_bench.json").read_text())
    assert results["meta"]["smoke"] is True
    rows = {r["name"]: r for r in results["train"]}
    assert set(rows) == RUNS
    for r in rows.values():
        assert r["s_per_step"] > 0 and r["images_per_s"] > 0 and r["unet_forward_tflop"] > 0, r
    # the real configs' FLOPs are counted even in the smoke: a bigger batch, proportionally more FLOPs
    assert abs(rows["sd1_b8"]["unet_forward_tflop"] / rows["sd1_b1"]["unet_forward_tflop"] - 8) < 0.01
    assert "--fp8_base" in rows["sdxl_b1_fp8"]["options"]
    assert {r["name"] for r in results["train"] if r.get("profile")} == {"sd1_b8", "sdxl_b1"}
    assert [g["name"].split()[1] for g in results["gen"]] == ["ours", "diffusers"]
    md = (out / "gpu_bench.md").read_text()
    assert "| sdxl_b1_fp8 |" in md and "torch.profiler: sd1_b8" in md and "ours / diffusers images/s" in md
    flux = json.loads((out / "flux_bench.json").read_text())["rows"]
    assert [(r["fp8_base"], r["blocks_to_swap"] > 0) for r in flux] == [(False, False), (True, False), (True, True),
                                                                       (True, True)]
    assert all(r["s_per_step"] > 0 and r["loss"] == r["loss"] for r in flux)  # steps ran, the loss is a number


def test_gpu_script_needs_an_output_folder():
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "usage" in proc.stderr
