#!/usr/bin/env python
"""DreamBooth: train the U-Net (and text encoder) of SD 1.x / 2.x in full, with regularization images.

    accelerate launch train_db.py --config_file db.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.config.config_file import parse_args_with_config  # noqa: E402
from library.config.options import build_parser  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402
from library.log import setup_logging_from_args  # noqa: E402


def setup_parser():
    return build_parser("train_db")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    setup_logging_from_args(args)
    from library.training.run_dreambooth import run

    run(args)


if __name__ == "__main__":
    main()
