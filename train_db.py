#!/usr/bin/env python
"""DreamBooth: train the U-Net (and text encoder) of SD 1.x / 2.x in full, with regularization images.

    accelerate launch train_db.py --config_file db.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import ScriptTrainer, train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("train_db")


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("train_db", args)


def main(argv=None) -> None:
    entry.trainer_main("train_db", argv)


if __name__ == "__main__":
    main()
