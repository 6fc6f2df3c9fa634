#!/usr/bin/env python
"""Write deterministic tiny SD1 / SD2 / SDXL models (real key layout, few channels) for tests and demos.

    python tools/make_tiny_model.py --family sd1 --out tiny/
    -> tiny/sd1-diffusers/ (Diffusers folder) and tiny/sd1.safetensors (original LDM single file)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402


def write_tiny_model(family: str, out: str | Path, seed: int = 0, v_parameterization: bool = False,
                     formats: tuple[str, ...] = ("diffusers", "safetensors")) -> dict[str, Path]:
    """Build the tiny model of ``family`` and write the requested formats; returns their paths."""
    from library.models.saving import save_diffusers, save_ldm_checkpoint
    from library.models.tiny import build_tiny_models

    out = Path(out)
    models = build_tiny_models(family, seed=seed, v_parameterization=v_parameterization)
    paths = {}
    if "diffusers" in formats:
        paths["diffusers"] = out / f"{family}-diffusers"
        save_diffusers(models, str(paths["diffusers"]))
    for ext in ("safetensors", "ckpt"):
        if ext in formats:
            paths[ext] = out / f"{family}.{ext}"
            save_ldm_checkpoint(models, str(paths[ext]))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd1", "sd2", "sdxl", "all"], default="all", help="model family (default all)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same bytes)")
    p.add_argument("--v_parameterization", action="store_true", help="mark the Diffusers scheduler as v-prediction")
    p.add_argument("--formats", default="diffusers,safetensors",
                   help="comma list of diffusers, safetensors, ckpt (default diffusers,safetensors)")
    add_logging_arguments(p)
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    families = ["sd1", "sd2", "sdxl"] if args.family == "all" else [args.family]
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    for fam in families:
        for kind, path in write_tiny_model(fam, args.out, args.seed, args.v_parameterization, formats).items():
            print(f"{fam} {kind}: {path}")


if __name__ == "__main__":
    main()
