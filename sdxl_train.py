#!/usr/bin/env python
"""Fine-tune SDXL in full (U-Net, optionally both text encoders) from metadata JSON, DreamBooth folders or a
dataset config.

    accelerate launch sdxl_train.py --config_file sdxl_ft.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("sdxl_train")


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("sdxl_train", args)


def main(argv=None) -> None:
    entry.trainer_main("sdxl_train", argv)


if __name__ == "__main__":
    main()
