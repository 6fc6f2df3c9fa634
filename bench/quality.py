#!/usr/bin/env python
"""Does the loss function change what training learns? Prompt accuracy against training steps.

    python bench/quality.py [--steps 5000] [--every 1000] [--out bench_out/quality]

The demo's job (a LoRA that teaches the shapes base model the heart, trigger ``sks``) is trained once per
loss setting, from the same seed, data and batches, with a LoRA saved every ``--every`` steps. Each saved
LoRA (and the base model, step 0) generates the same prompts with the same seeds, and the strict judge
(library/shapes/judge.py: a shape only when the evidence is clear, otherwise ``none``) scores them. Prints a markdown table (new-concept prompt accuracy per step, accuracy on the
base model's held-out pairs at the end) and writes ``quality.png`` and ``quality.json`` into --out.

Loss settings (sd-scripts options): ``l2``; ``huber`` with ``--huber_schedule snr``; ``smooth_l1`` (also
snr schedule, the default); ``l2`` with ``--min_snr_gamma 5``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

SETTINGS: dict[str, dict] = {
    "l2": {"loss_type": "l2"},
    "huber (snr)": {"loss_type": "huber", "huber_schedule": "snr"},
    "smooth_l1": {"loss_type": "smooth_l1", "huber_schedule": "snr"},
    "min_snr_gamma=5": {"loss_type": "l2", "min_snr_gamma": 5.0},
}


def run(out: Path, steps: int, every: int, seed: int, prompts_per_color: int, names: list[str]) -> dict:
    import torch

    import train_network
    from library.shapes import demo

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # every point: the new concept in 8 colours and the 5 held-out pairs (the hardest old prompts)
    kw = dict(steps=steps, seed=seed, prompts_per_color=prompts_per_color, heldout_prompts_per_pair=4,
              train_prompts_per_pair=0)
    base = demo.DemoSettings(loss_options={}, **kw)
    out.mkdir(parents=True, exist_ok=True)
    dataset_toml = demo.make_datasets(out, base)
    prompts, groups = demo.write_prompts(out, base)
    table: dict[str, dict] = {}
    step0 = demo.judge(demo.generate(out / "base" / "images", prompts, base), groups)
    for name in names:
        run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
        s = demo.DemoSettings(loss_options=dict(SETTINGS[name]), extra_train_options={"save_every_n_steps": every}, **kw)
        config = demo.write_train_config(run_dir, dataset_toml, s)
        t0 = time.perf_counter()
        train_network.main(["--config_file", str(config)])
        seconds = time.perf_counter() - t0
        points = {0: step0}
        for k in range(every, steps + 1, every):
            name_k = f"{demo.TRIGGER}_heart" + ("" if k == steps else f"-step{k:08d}")
            lora = run_dir / "lora" / f"{name_k}.safetensors"
            if not lora.is_file():
                raise SystemExit(f"bench/quality.py: expected {lora} after training")
            points[k] = demo.judge(demo.generate(run_dir / f"images_{k}", prompts, s, lora=lora), groups)
        table[name] = {"options": SETTINGS[name], "train_seconds": seconds, "points": points}
    return table


def markdown(table: dict, steps: int, every: int) -> str:
    ks = list(range(0, steps + 1, every))
    head = "| loss | " + " | ".join(f"step {k}" for k in ks) + " | held-out old pairs, end | train s |"
    lines = ["New-concept prompt accuracy (`a <colour> sks` judged a heart of that colour by the strict judge) "
             "after k steps:", "",
             head, "|" + "---|" * (len(ks) + 3)]
    for name, row in table.items():
        pts = row["points"]
        cells = [f"{100 * pts[k]['new concept']['prompt_accuracy']:.0f}%" for k in ks]
        old = pts[steps]["old, held-out pairs"]["prompt_accuracy"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * old:.0f}% | {row['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/quality", help="working folder (default bench_out/quality)")
    p.add_argument("--steps", type=int, default=5000,
                   help="LoRA training steps per setting (default 5000, the demo's)")
    p.add_argument("--every", type=int, default=1000, help="evaluate every N steps (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, training and sampling (default 0)")
    p.add_argument("--prompts_per_color", type=int, default=5,
                   help="new-concept prompts per colour, 8 colours (default 5)")
    p.add_argument("--from_json", default=None, help="redraw table and plot from a quality.json, no training")
    p.add_argument("--only", default=None, help=f"comma list of settings (default all: {', '.join(SETTINGS)})")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"--only: unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if args.steps % args.every:
        p.error("--steps must be a multiple of --every")
    out = Path(args.out)
    if args.from_json:  # redraw the table and plot of an earlier run
        table = {n: {**row, "points": {int(k): v for k, v in row["points"].items()}}
                 for n, row in json.loads(Path(args.from_json).read_text(encoding="utf-8")).items()}
    else:
        table = run(out, args.steps, args.every, args.seed, args.prompts_per_color, names)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    print(markdown(table, args.steps, args.every))
    print(f"plot: {plot(table, args.steps, args.every, out / 'quality.png')}")


def plot(table: dict, steps: int, every: int, path: Path) -> Path:
    from library.shapes.plots import line_chart

    ks = list(range(0, steps + 1, every))
    series = {n: (ks, [100 * row["points"][k]["new concept"]["prompt_accuracy"] for k in ks]) for n, row in table.items()}
    return line_chart(series, path, title="new-concept prompt accuracy vs LoRA steps (bench/quality.py)",
                      xlabel="step", ylabel="%", y_range=(0, 100), markers=True)


if __name__ == "__main__":
    main()
