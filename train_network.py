#!/usr/bin/env python
"""Train a LoRA (or any --network_module) on SD 1.x / 2.x, with sd-scripts' options and files.

    accelerate launch train_network.py --config_file lora.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import ScriptTrainer, train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("train_network")


class NetworkTrainer(ScriptTrainer):
    """sd-scripts' trainer class, for wrappers: ``NetworkTrainer().train(args)`` (library/compat/trainers.py)."""

    script = "train_network"


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("train_network", args)


def main(argv=None) -> None:
    entry.trainer_main("train_network", argv)


if __name__ == "__main__":
    main()
