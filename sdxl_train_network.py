#!/usr/bin/env python
"""Train a LoRA (or any --network_module) on SDXL, with sd-scripts' options and files.

    accelerate launch sdxl_train_network.py --config_file sdxl_lora.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("sdxl_train_network")


def main(argv=None) -> None:
    entry.trainer_main("sdxl_train_network", argv)


if __name__ == "__main__":
    main()
