#!/usr/bin/env python
"""Fine-tune SD 1.x / 2.x in full from metadata JSON (--in_json) or a dataset config.

    accelerate launch fine_tune.py --config_file ft.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import ScriptTrainer, train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("fine_tune")


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("fine_tune", args)


def main(argv=None) -> None:
    entry.trainer_main("fine_tune", argv)


if __name__ == "__main__":
    main()
