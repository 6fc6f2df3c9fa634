#!/usr/bin/env python
"""The embedded default job (README command #1, ``bash demo.sh``).

Teaches the committed shapes base model (models/shapes-sd1.safetensors) a shape it never saw, the heart,
with a LoRA trained by ``train_network.py --config_file``, then generates before/after images with
``gen_img.py`` and judges them. Writes report.md, report.json, grid.png and loss.png into --out.
Offline, CPU only; a few minutes on 2 cores. See docs/demo.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Tiny models: one OpenMP thread per process is many times faster than two on a busy 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.shapes.demo import DemoSettings, run_demo  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--base_model", default=d.base_model, help="base model file (default: the committed shapes model)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"LoRA training steps (default {d.steps})")
    p.add_argument("--images", type=int, default=d.images,
                   help=f"concept images, and as many regularisation images (default {d.images})")
    p.add_argument("--prompts_per_color", type=int, default=d.prompts_per_color,
                   help=f"new-concept prompts per colour, before and after (default {d.prompts_per_color})")
    p.add_argument("--scale", type=float, default=d.guidance_scale,
                   help=f"classifier-free guidance scale of gen_img, before and after (default {d.guidance_scale})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of data, training and sampling (default {d.seed})")
    add_logging_arguments(p)
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    settings = DemoSettings(base_model=args.base_model, steps=args.steps, images=args.images,
                            prompts_per_color=args.prompts_per_color, seed=args.seed,
                            guidance_scale=args.scale)
    result = run_demo(args.out, settings)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    print(f"done in {result['seconds']:.0f} s; files in {args.out}/")
    return result


if __name__ == "__main__":
    main()
