#!/usr/bin/env python
"""Train a Textual Inversion embedding (A1111-compatible .pt / .safetensors) for SD 1.x / 2.x.

    accelerate launch train_textual_inversion.py --config_file ti.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.config.config_file import parse_args_with_config  # noqa: E402
from library.config.options import build_parser  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402
from library.log import setup_logging_from_args  # noqa: E402


def setup_parser():
    return build_parser("train_textual_inversion")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    setup_logging_from_args(args)
    from library.training.run_textual_inversion import run

    run(args)


if __name__ == "__main__":
    main()
