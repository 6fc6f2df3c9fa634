#!/usr/bin/env python
"""Merge LoRA files into an SDXL checkpoint, or into one SDXL LoRA (spec utilities §7).

Same behaviour and options as ``merge_lora.py`` without ``--v2``: LoRA modules are found by their
``lora_te1``/``lora_te2``/``lora_unet`` (LDM-path) names; the merged checkpoint keeps every other tensor
of the source file. LoRA+LoRA merges scale by ratio·|ratio| as sd-scripts (pitfall 4, warned).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

from library.errors import exit_on_user_error  # noqa: E402
from library.log import setup_logging_from_args  # noqa: E402
from networks.merge_lora import build_parser, run  # noqa: E402


def setup_parser():
    parser = build_parser(sdxl=True)
    parser.description = __doc__
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    run(args, sdxl=True)


if __name__ == "__main__":
    main()
