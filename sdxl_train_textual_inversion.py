#!/usr/bin/env python
"""Train a Textual Inversion embedding for SDXL: both text encoders, saved as ``clip_l`` / ``clip_g``.

    accelerate launch sdxl_train_textual_inversion.py --config_file sdxl_ti.toml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.compat.trainers import ScriptTrainer, train_script  # noqa: E402
from library.training import entry  # noqa: E402


def setup_parser():
    return entry.setup_parser("sdxl_train_textual_inversion")


class SdxlTextualInversionTrainer(ScriptTrainer):
    """sd-scripts' trainer class, for wrappers: ``SdxlTextualInversionTrainer().train(args)``
    (library/compat/trainers.py)."""

    script = "sdxl_train_textual_inversion"


def train(args):
    """Train with an already parsed namespace (sd-scripts' module-level ``train(args)``, used by wrappers)."""
    return train_script("sdxl_train_textual_inversion", args)


def main(argv=None) -> None:
    entry.trainer_main("sdxl_train_textual_inversion", argv)


if __name__ == "__main__":
    main()
