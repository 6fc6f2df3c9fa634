#!/usr/bin/env python
"""Convert Stable Diffusion models between the original single-file layout and Diffusers folders.

    python convert_model.py model.safetensors out_diffusers/ --use_safetensors
    python convert_model.py out_diffusers/ model.safetensors --fp16
SD 1.x, 2.x and SDXL; the family is detected from the weights (--v1/--v2/--sdxl are checked against it).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.models.convert import add_convert_arguments, convert  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_arguments(p)
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    convert(args)


if __name__ == "__main__":
    main()
