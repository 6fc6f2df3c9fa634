#!/usr/bin/env python
"""Generate images with Stable Diffusion 1.x / 2.x / XL: txt2img, img2img, inpaint, hires fix, LoRA, TI.

Drop-in for sd-scripts' gen_img.py (spec generation.md); see docs/gen_img.md for options and differences.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import exit_on_user_error  # noqa: E402
from library.log import setup_logging_from_args  # noqa: E402
from library.sampling.gen_options import build_gen_parser  # noqa: E402


def setup_parser():
    return build_gen_parser()


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[str]:
    args = build_gen_parser().parse_args(argv)
    setup_logging_from_args(args)
    from library.sampling.gen_runner import run

    return run(args)


if __name__ == "__main__":
    main()
