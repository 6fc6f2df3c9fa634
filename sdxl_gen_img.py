#!/usr/bin/env python
"""sd-scripts' SDXL generator name: ``gen_img.py`` for SDXL models (same options; the model must be SDXL).

    python sdxl_gen_img.py --ckpt sdxl.safetensors --outdir out --prompt "a cat" --W 1024 --H 1024
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_img  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402


def setup_parser():
    parser = gen_img.setup_parser()
    parser.prog = "sdxl_gen_img.py"
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[str]:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--v1", "--v2"):
        if flag in argv:
            raise UserError(f"sdxl_gen_img.py generates with SDXL models only ({flag} was given); "
                            "use gen_img.py for SD 1.x / 2.x models")
    if "--sdxl" not in argv:
        argv.append("--sdxl")  # checked against the weights: an SD 1.x/2.x model is one clear error
    return gen_img.main(argv)


if __name__ == "__main__":
    main()
