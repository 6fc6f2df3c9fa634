#!/usr/bin/env python
"""Write deterministic tiny SD1 / SD2 / SDXL / FLUX.1 models (real key layout, few channels) for tests and demos.

    python tools/make_tiny_model.py --family sd1 --out tiny/
    -> tiny/sd1-diffusers/ (Diffusers folder) and tiny/sd1.safetensors (original LDM single file)
    python tools/make_tiny_model.py --family flux-dev --out tiny/
    -> tiny/flux-dev-diffusers/ and BFL files tiny/flux-dev.safetensors (transformer), tiny/flux-dev_ae.safetensors,
       tiny/flux-dev_clip_l.safetensors, tiny/flux-dev_t5xxl.safetensors, with tiny/flux-dev_tokenizers/ for
       --tokenizer_cache_dir (the T5 tokenizer, sd-scripts' google_t5-v1_1-xxl layout)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import UserError, exit_on_user_error  # noqa: E402
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


def write_tiny_flux(name: str, out: str | Path, seed: int = 0,
                    formats: tuple[str, ...] = ("diffusers", "safetensors"),
                    blocks: tuple[int, int] = (2, 2)) -> dict[str, Path]:
    """Tiny FLUX.1 ``name`` (dev / schnell): a Diffusers folder and / or BFL files; returns their paths.
    ``blocks``: (double, single) transformer block counts."""
    from library.models.flux_config import T5_TOKENIZER_HUB_ID
    from library.models.flux_saving import save_flux_diffusers, save_flux_files
    from library.models.flux_tiny import build_tiny_flux

    out = Path(out)
    models = build_tiny_flux(name, seed=seed, blocks=blocks)
    stem = f"flux-{name}"
    paths: dict[str, Path] = {}
    if "diffusers" in formats:
        paths["diffusers"] = out / f"{stem}-diffusers"
        save_flux_diffusers(models, str(paths["diffusers"]))
    if "safetensors" in formats:
        files = {"transformer": out / f"{stem}.safetensors"}
        files.update({part: out / f"{stem}_{part}.safetensors" for part in ("ae", "clip_l", "t5xxl")})
        save_flux_files(models, {k: str(v) for k, v in files.items()})
        paths.update(files)
        paths["tokenizer_cache_dir"] = out / f"{stem}_tokenizers"
        models.tokenizers[1].save_pretrained(str(paths["tokenizer_cache_dir"] / T5_TOKENIZER_HUB_ID.replace("/", "_")))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd1", "sd2", "sdxl", "flux-dev", "flux-schnell", "all"],
                   default="all", help="model family (default all: sd1, sd2, sdxl)")
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
        if fam.startswith("flux-"):
            if args.v_parameterization or "ckpt" in formats:
                raise UserError("--family flux-*: FLUX models take no --v_parameterization and have no .ckpt format")
            written = write_tiny_flux(fam[len("flux-"):], args.out, args.seed, formats)
        else:
            written = write_tiny_model(fam, args.out, args.seed, args.v_parameterization, formats)
        for kind, path in written.items():
            print(f"{fam} {kind}: {path}")


if __name__ == "__main__":
    main()
