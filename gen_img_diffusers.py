#!/usr/bin/env python
"""sd-scripts' older generator name: the same as ``gen_img.py`` (SD 1.x / 2.x; SDXL works too here).

The options only that generator had (CLIP / CLIP-image / VGG16 guidance, ``--XTI_embeddings``) are
rejected with one line, as in gen_img.py; every other option is spelled and behaves as there.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_img  # noqa: E402


def setup_parser():
    parser = gen_img.setup_parser()
    parser.prog = "gen_img_diffusers.py"
    return parser


def main(argv: list[str] | None = None) -> list[str]:
    return gen_img.main(argv)


if __name__ == "__main__":
    main()
