#!/usr/bin/env python
"""Train a LoRA (or any --network_module) on SDXL, with sd-scripts' options and files.

    accelerate launch sdxl_train_network.py --config_file sdxl_lora.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.config.config_file import parse_args_with_config  # noqa: E402
from library.config.options import build_parser  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402
from library.log import setup_logging_from_args  # noqa: E402


def setup_parser():
    return build_parser("sdxl_train_network")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    setup_logging_from_args(args)
    from library.training.run_network import run

    run(args, sdxl=True)


if __name__ == "__main__":
    main()
