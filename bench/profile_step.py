#!/usr/bin/env python
"""Where one LoRA training step spends its time: this project's train_network.py and upstream sd-scripts
v0.8.7's, on the random real-size SD1.5 of ../shared/upstream-bench, same options (issue 18 item 1).

Each tool runs twice under ``torch.profiler`` (CPU), with ``--short`` and ``--long`` steps; an operator's cost
per step is (self CPU time in the long run - in the short run) / (long - short), so loading, caching and saving
cancel out. Prints one markdown table: the top operators of both tools by self CPU time per step.

    .venv/bin/python bench/profile_step.py [--run lora|c3lier] [--resolution 64] [--short 1] [--long 3]

Needs the harness set up once (../shared/upstream-bench/README.md). ``OMP_NUM_THREADS`` defaults to 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "upstream-bench"

# Runs inside each tool's own interpreter: the profiler around the whole script, operator totals to a JSON file.
LAUNCH = r"""
import json, runpy, sys, torch
out, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [script] + argv
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
rows = {e.key: [e.self_cpu_time_total, e.count] for e in prof.key_averages()}
json.dump(rows, open(out, "w"))
"""


def _profile(python: str, script: list[str], argv: list[str], env: dict, cwd: str | None, out: str) -> dict:
    cmd = [python, "-c", LAUNCH, out, *script, *argv]
    done = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = done.stdout.decode(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"profile: {script[0]} rc={done.returncode}: {' | '.join(tail)}")
    return json.loads(Path(out).read_text())


def per_step(short: dict, long: dict, steps: int) -> dict[str, tuple[float, float]]:
    """op -> (self CPU ms per step, calls per step)."""
    out = {}
    for key, (t_long, n_long) in long.items():
        t_short, n_short = short.get(key, (0.0, 0))
        out[key] = ((t_long - t_short) / steps / 1000.0, (n_long - n_short) / steps)
    return out


def table(ours: dict, upstream: dict, top: int) -> str:
    keys = sorted(set(ours) | set(upstream), key=lambda k: -max(ours.get(k, (0, 0))[0], upstream.get(k, (0, 0))[0]))
    lines = ["| operator | ours ms/step | calls | upstream ms/step | calls |", "|---|---|---|---|---|"]
    for k in keys[:top]:
        o, u = ours.get(k, (0.0, 0.0)), upstream.get(k, (0.0, 0.0))
        lines.append(f"| `{k}` | {o[0]:.1f} | {o[1]:.0f} | {u[0]:.1f} | {u[1]:.0f} |")
    tot_o = sum(max(v[0], 0.0) for v in ours.values())
    tot_u = sum(max(v[0], 0.0) for v in upstream.values())
    lines.append(f"| **all operators** | **{tot_o:.0f}** | | **{tot_u:.0f}** | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="lora", choices=["lora", "c3lier"])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--short", type=int, default=1)
    ap.add_argument("--long", type=int, default=3)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HARNESS))
    import kohya_oracle as ko

    model = ko.ensure_model()
    work = tempfile.mkdtemp(prefix="profile_step_")
    data = ko.make_dataset(work)

    def options(steps: int, out_dir: str) -> list[str]:
        o, _ = ko.run_options(a.run, model=model, tokenizer_cache=ko.tokenizer_cache(), output_dir=out_dir,
                              train_data_dir=data, dataset_config="")
        o = list(o)
        o[o.index("--max_train_steps") + 1] = str(steps)
        o[o.index("--resolution") + 1] = str(a.resolution)
        o[o.index("--max_bucket_reso") + 1] = str(max(128, 2 * a.resolution))  # the harness's 128 fits 64 px only
        return o

    env = dict(os.environ, OMP_NUM_THREADS=a.threads, MKL_NUM_THREADS=a.threads, PYTHONWARNINGS="ignore")
    tools = {
        "ours": (sys.executable, [str(ROOT / "train_network.py")], dict(env, PYTHONPATH=str(ROOT)), str(ROOT)),
        "upstream": (ko.kohya_python(), [str(HARNESS / "run_upstream.py"), "--upstream", ko.upstream_dir(), "--"],
                     env, None),
    }
    result = {}
    for name, (python, script, tool_env, cwd) in tools.items():
        runs = {}
        for steps in (a.short, a.long):
            out_dir = os.path.join(work, f"{name}_{steps}")
            runs[steps] = _profile(python, script, options(steps, out_dir), tool_env, cwd,
                                   os.path.join(work, f"{name}_{steps}.json"))
        result[name] = per_step(runs[a.short], runs[a.long], a.long - a.short)
    print(f"### One step, `{a.run}` options, {a.resolution} px, {a.threads} thread(s): self CPU time per operator\n")
    print(table(result["ours"], result["upstream"], a.top))


if __name__ == "__main__":
    main()
