#!/usr/bin/env python
"""Train a LoRA (or any --network_module) on SDXL, with sd-scripts' options and files.

    accelerate launch sdxl_train_network.py --config_file sdxl_lora.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import ScriptTrainer, train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("sdxl_train_network")


class SdxlNetworkTrainer(ScriptTrainer):
    """sd-scripts' trainer class, for wrappers: ``SdxlNetworkTrainer().train(args)`` (library/compat/trainers.py)."""

    script = "sdxl_train_network"


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("sdxl_train_network", args)


def main(argv=None) -> None:
    entry.trainer_main("sdxl_train_network", argv)


if __name__ == "__main__":
    main()
