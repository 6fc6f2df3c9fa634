#!/usr/bin/env python
"""sd-scripts' converter name (kohya_ss's utility tab calls it): the same as ``convert_model.py``.

    python tools/convert_diffusers20_original_sd.py model.safetensors out_diffusers --use_safetensors
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import convert_model  # noqa: E402


def setup_parser():
    parser = convert_model.setup_parser()
    parser.prog = "convert_diffusers20_original_sd.py"
    return parser


def main(argv=None) -> None:
    convert_model.main(argv)


if __name__ == "__main__":
    main()
