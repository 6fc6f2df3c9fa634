#!/usr/bin/env python
"""Seconds per training step of this project's ``train_network.py`` and upstream sd-scripts v0.8.7's, timed
inside each process at the optimizer step (``bench/step_clock.py``), same options.

``bench/upstream_speed.py`` takes s/step from the difference of two whole-process wall times; on a 2-core VM the
start-up noise can swamp that difference. Here every run yields ``--steps - 1`` step intervals; the first
``--warmup`` are dropped and the median of the rest is the run's s/step.

Two ways to share the machine fairly:
  * default: the runs alternate (ours, upstream, upstream, ours, ...), each alone on the machine;
  * ``--together`` (1 thread only): both tools run at the same time, each pinned to its own core, and swap
    cores every repeat, so a VM whose speed drifts by 10-20 % from minute to minute hits both alike.

    .venv/bin/python bench/upstream_step_speed.py --repeats 2 --steps 12 --warmup 2 --threads 2 --run lora
    .venv/bin/python bench/upstream_step_speed.py --repeats 2 --steps 16 --together --run c3lier --resolution 256
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "upstream-bench"
sys.path[:0] = [str(ROOT), str(HARNESS)]

import kohya_oracle as ko  # noqa: E402

from bench.upstream_speed import with_bucket_limit  # noqa: E402

CLOCK = ROOT / "bench" / "step_clock.py"
TOOLS = ("ours", "upstream")


@dataclass
class Run:
    cmd: list[str]
    env: dict
    cwd: str | None
    log: str


def run_options(run: str, steps: int, resolution: int, **paths: str) -> list[str]:
    """The harness's option set, with the step count and resolution set and the bucket limit raised to 2x the
    resolution for both tools (the harness keeps 128, which both refuse above 128 px)."""
    options, _ = ko.run_options(run, **paths)
    options = list(options)
    options[options.index("--max_train_steps") + 1] = str(steps)
    if "--resolution" in options:
        options[options.index("--resolution") + 1] = str(resolution)
    return with_bucket_limit(options, resolution)


def start(run: Run, core: int | None) -> subprocess.Popen:
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    return subprocess.Popen(run.cmd, env=run.env, cwd=run.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=pin)


def step_times(tool: str, run: Run, proc: subprocess.Popen, steps: int, warmup: int) -> list[float]:
    """The run's step intervals after warm-up; prints its CPU time and page faults per step."""
    out = proc.communicate()[0]
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"bench: {tool} rc={proc.returncode}: {' | '.join(tail)}")
    stamps = [[float(v) for v in line.split()] for line in Path(run.log).read_text().splitlines()]
    if len(stamps) != steps:
        raise SystemExit(f"bench: {tool} logged {len(stamps)} optimizer steps for {steps} training steps")
    first, last, n = stamps[warmup], stamps[-1], len(stamps) - 1 - warmup
    times = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][warmup:]
    print(f"  {tool:8s} {statistics.median(times):.3f} s/step ({' '.join(f'{t:.2f}' for t in times)}); "
          f"per step user {(last[1] - first[1]) / n:.2f} s, system {(last[2] - first[2]) / n:.2f} s, "
          f"{(last[3] - first[3]) / n:.0f} minor faults", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="step intervals dropped at the start of each run")
    ap.add_argument("--run", default="lora", help="option set of the harness: lora, c3lier, toml")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--together", action="store_true", help="run both tools at once, one core each (1 thread)")
    ap.add_argument("--only", choices=TOOLS, help="time one tool (no ratio)")
    a = ap.parse_args()
    if a.steps - 1 <= a.warmup:
        ap.error("--steps must leave at least one interval after --warmup")
    if a.together and (a.threads != "1" or a.only or len(os.sched_getaffinity(0)) < 2):
        ap.error("--together needs --threads 1, both tools and two usable cores")

    model = ko.ensure_model()
    work = tempfile.mkdtemp(prefix="step_speed_")
    data = ko.make_dataset(work)
    toml_path = ko.write_dataset_toml(work, data)
    env = dict(os.environ, OMP_NUM_THREADS=a.threads, MKL_NUM_THREADS=a.threads, PYTHONWARNINGS="ignore")

    def prepare(tool: str, i: int) -> Run:
        log = os.path.join(work, f"{tool}_{i}.steps")
        options = run_options(a.run, a.steps, a.resolution, model=model, tokenizer_cache=ko.tokenizer_cache(),
                              output_dir=os.path.join(work, f"{tool}_{i}"), train_data_dir=data,
                              dataset_config=toml_path)
        clock = [str(CLOCK), "--log", log, "--"]
        if tool == "upstream":
            script = [str(HARNESS / "run_upstream.py"), "--upstream", ko.upstream_dir(), "--"]
            return Run([ko.kohya_python()] + clock + script + options, env, None, log)
        return Run([sys.executable] + clock + [str(ROOT / "train_network.py")] + options,
                   dict(env, PYTHONPATH=str(ROOT)), str(ROOT), log)

    times: dict[str, list[float]] = {t: [] for t in TOOLS}
    medians: dict[str, list[float]] = {t: [] for t in TOOLS}
    cores = sorted(os.sched_getaffinity(0))[:2]
    for i in range(a.repeats):
        order = TOOLS if i % 2 == 0 else TOOLS[::-1]
        print(f"repeat {i + 1}" + (f": ours on core {cores[i % 2]}, upstream on core {cores[1 - i % 2]}"
                                   if a.together else ""), flush=True)
        if a.together:
            runs = {t: prepare(t, i) for t in TOOLS}
            procs = {t: start(runs[t], cores[(i + k) % 2]) for k, t in enumerate(TOOLS)}
            results = {t: step_times(t, runs[t], procs[t], a.steps, a.warmup) for t in order}
        else:
            results = {}
            for tool in [t for t in order if a.only in (None, t)]:
                run = prepare(tool, i)
                results[tool] = step_times(tool, run, start(run, None), a.steps, a.warmup)
        for tool, ts in results.items():
            times[tool].extend(ts)
            medians[tool].append(statistics.median(ts))

    shown = [t for t in TOOLS if times[t]]
    print(f"{'tool':9s} {'s/step':>8s} {'per repeat':>24s} {'all steps min-max':>19s}")
    for tool in shown:
        per = "/".join(f"{m:.3f}" for m in medians[tool])
        print(f"{tool:9s} {statistics.median(times[tool]):8.3f} {per:>24s} "
              f"{min(times[tool]):9.3f}-{max(times[tool]):.3f}")
    if len(shown) == 2:
        ratio = statistics.median(times["ours"]) / statistics.median(times["upstream"])
        per = "/".join(f"{o / u:.2f}" for o, u in zip(medians["ours"], medians["upstream"]))
        print(f"ratio ours/upstream s/step: {ratio:.2f} (per repeat {per}; run {a.run}, {a.resolution}px, "
              f"{a.threads} thread(s){', together' if a.together else ''}, {a.repeats} repeats x "
              f"{a.steps - 1 - a.warmup} timed steps)")


if __name__ == "__main__":
    main()
