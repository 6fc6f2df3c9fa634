"""``NetworkTrainer().train(args)`` and ``train(args)``, as wrappers call sd-scripts' trainers.

kohya-colab's wrappers do ``parser = setup_parser(); args = parser.parse_args();
args = read_config_from_file(args, parser); NetworkTrainer().train(args)``. Here ``train`` fills the
options the namespace lacks with the script's defaults, applies the config-file key rule to attributes
that are not options, and runs the script's runner. Errors propagate as exceptions (``UserError`` for
bad input) instead of ending the process, as upstream's ``train`` does, so the caller decides.
"""
from __future__ import annotations

import argparse
from typing import Any

from library.config.config_file import drop_foreign_keys
from library.training import entry


def train_script(script: str, args: argparse.Namespace) -> Any:
    """Run ``script`` (e.g. ``"train_network"``) with a namespace built by its parser or by hand."""
    parser = entry.setup_parser(script)
    defaults = vars(parser.parse_args([]))
    given = dict(vars(args))
    extras = {k: v for k, v in given.items() if k not in defaults}
    if extras:
        drop_foreign_keys(extras, list(defaults), script, f"the options passed to {script}'s train()")
    completed = argparse.Namespace(**{**defaults, **{k: v for k, v in given.items() if k in defaults}})
    return entry.run_script(script, completed)


class ScriptTrainer:
    """Base of the trainer classes the top-level scripts export (``NetworkTrainer``, ...)."""

    script = ""

    def train(self, args: argparse.Namespace) -> Any:
        return train_script(self.script, args)
