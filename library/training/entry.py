"""The one ``main`` of every trainer script: options (+ ``--config_file``), logging, the script's runner."""
from __future__ import annotations

import argparse
import importlib
from typing import Sequence

from library.config.config_file import parse_args_with_config
from library.config.options import build_parser
from library.errors import exit_on_user_error
from library.log import setup_logging_from_args
from library.training.memory.host_allocator import keep_freed_memory
from library.training.runners.run_lock import releasing

# script -> (runner module, keyword arguments of its run())
RUNNERS = {
    "train_network": ("library.training.runners.run_network", {"sdxl": False}),
    "sdxl_train_network": ("library.training.runners.run_network", {"sdxl": True}),
    "train_db": ("library.training.runners.run_dreambooth", {}),
    "fine_tune": ("library.training.runners.run_finetune", {}),
    "train_textual_inversion": ("library.training.runners.run_textual_inversion", {}),
    "sdxl_train_textual_inversion": ("library.training.runners.run_textual_inversion", {"sdxl": True}),
    "sdxl_train": ("library.training.runners.run_sdxl_train", {}),
    "train_controlnet": ("library.training.runners.run_controlnet", {}),
    "sdxl_train_control_net_lllite": ("library.training.runners.run_control_net_lllite", {}),
    "flux_train_network": ("library.training.runners.run_flux_network", {}),
}


def setup_parser(script: str) -> argparse.ArgumentParser:
    """The script's parser (sd-scripts exposes ``setup_parser()`` in every trainer)."""
    return build_parser(script)


@exit_on_user_error
def trainer_main(script: str, argv: Sequence[str] | None = None) -> None:
    args = parse_args_with_config(setup_parser(script), argv, script)
    run_script(script, args)


def run_script(script: str, args: argparse.Namespace):
    """Set up logging and run ``script``'s runner on parsed options; returns what the runner returns
    (the final file's path, or None after ``--dry_run``). ``UserError`` propagates."""
    setup_logging_from_args(args)
    keep_freed_memory()  # before any model loads: every step reuses the memory the last one freed
    module, kwargs = RUNNERS[script]

    with releasing():  # the runner takes the output-name lock once its options are checked
        return importlib.import_module(module).run(args, **kwargs)  # imported late: --help stays fast
