#!/usr/bin/env python
"""Train a Textual Inversion embedding (A1111-compatible .pt / .safetensors) for SD 1.x / 2.x.

    accelerate launch train_textual_inversion.py --config_file ti.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import ScriptTrainer, train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("train_textual_inversion")


class TextualInversionTrainer(ScriptTrainer):
    """sd-scripts' trainer class, for wrappers: ``TextualInversionTrainer().train(args)`` (library/compat/trainers.py)."""

    script = "train_textual_inversion"


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("train_textual_inversion", args)


def main(argv=None) -> None:
    entry.trainer_main("train_textual_inversion", argv)


if __name__ == "__main__":
    main()
