#!/usr/bin/env python
"""Train a ControlNet (v1.x) for SD 1.x / 2.x from image + conditioning-image pairs, with sd-scripts' options and
files (docs/train_controlnet.md).

    accelerate launch train_controlnet.py --config_file controlnet.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("train_controlnet")


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("train_controlnet", args)


def main(argv=None) -> None:
    entry.trainer_main("train_controlnet", argv)


if __name__ == "__main__":
    main()
