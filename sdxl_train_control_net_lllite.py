#!/usr/bin/env python
"""Train a ControlNet-LLLite for SDXL from image + conditioning-image pairs, with sd-scripts' options and files
(docs/sdxl_train_control_net_lllite.md).

    accelerate launch sdxl_train_control_net_lllite.py --config_file lllite.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("sdxl_train_control_net_lllite")


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("sdxl_train_control_net_lllite", args)


def main(argv=None) -> None:
    entry.trainer_main("sdxl_train_control_net_lllite", argv)


if __name__ == "__main__":
    main()
