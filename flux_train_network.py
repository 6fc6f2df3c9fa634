#!/usr/bin/env python
"""Train a FLUX.1 LoRA (networks.lora_flux) on FLUX.1 dev / schnell, with sd-scripts' options and files.

    accelerate launch flux_train_network.py --config_file flux_lora.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import ScriptTrainer, train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("flux_train_network")


class FluxNetworkTrainer(ScriptTrainer):
    """sd-scripts' trainer class, for wrappers: ``FluxNetworkTrainer().train(args)`` (library/compat/trainers.py)."""

    script = "flux_train_network"


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("flux_train_network", args)


def main(argv=None) -> None:
    entry.trainer_main("flux_train_network", argv)


if __name__ == "__main__":
    main()
