#!/usr/bin/env python
"""The embedded default job (README command #1).

Today: build tiny SD1 / SD2 / SDXL models, convert each Diffusers -> single file -> Diffusers with
convert_model.py, load every result back and check it is bit-identical, and write a short report.
(Later issues grow this into "train a LoRA on a tiny shapes world and generate before/after images".)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import convert_model  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402


def _identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run_family(family: str, out: Path) -> dict:
    from library.models.loading import load_models
    from tools.make_tiny_model import write_tiny_model

    t0 = time.perf_counter()
    paths = write_tiny_model(family, out, formats=("diffusers",))
    single, back = out / f"{family}-converted.safetensors", out / f"{family}-roundtrip"
    convert_model.main([str(paths["diffusers"]), str(single)])
    convert_model.main([str(single), str(back), "--use_safetensors"])
    src, file_model, dst = load_models(str(paths["diffusers"])), load_models(str(single)), load_models(str(back))
    parts = lambda m: [m.unet, m.vae, *m.text_encoders]  # noqa: E731
    ok = all(_identical(a, b) and _identical(a, c) for a, b, c in zip(parts(src), parts(file_model), parts(dst)))
    n_params = sum(p.numel() for m in parts(src) for p in m.parameters())
    return {"family": family, "ok": ok, "params": n_params, "file_mib": single.stat().st_size / 2**20,
            "seconds": time.perf_counter() - t0}


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    add_logging_arguments(p)
    args = p.parse_args(argv)
    setup_logging_from_args(args)
    out = Path(args.out)
    rows = [run_family(f, out) for f in ("sd1", "sd2", "sdxl")]
    lines = ["# Demo report", "", "Tiny models converted Diffusers -> single file -> Diffusers and loaded back.", "",
             "| family | parameters | single file (MiB) | bit-identical | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['params']:,} | {r['file_mib']:.1f} | {'yes' if r['ok'] else 'NO'} | {r['seconds']:.1f} |"
              for r in rows]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    print(f"files in {out}/ (report.md, *-diffusers/, *-converted.safetensors, *-roundtrip/)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
