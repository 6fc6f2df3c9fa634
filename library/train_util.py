"""``library.train_util`` names that wrapper notebooks import from sd-scripts (thin adapters).

``read_config_from_file(args, parser)``: the ``--config_file`` / ``--output_config`` step on an already
parsed namespace, with this project's config rules (library/config/config_file.py). ``BucketManager``:
upstream's bucket interface (library/compat/bucket_manager.py). ``MinimalDataset``: the base class of a
``--dataset_class`` (library/data/custom_dataset.py). Anything else of upstream's train_util is
not provided; the trainers' own code never imports this module.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys

from library.compat.bucket_manager import BucketManager
from library.config.config_file import merge_config_file
from library.data.custom_dataset import MinimalDataset

__all__ = ["BucketManager", "MinimalDataset", "read_config_from_file"]


def read_config_from_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Merge ``args.config_file`` into ``args`` (command line > file > default), as upstream.

    Upstream parses ``sys.argv`` again into the file's values. That is done here too when ``sys.argv``
    still yields ``args``; otherwise (a namespace built in a notebook) the values of ``args`` that differ
    from the parser's defaults are laid over the file's values.
    """
    argv = sys.argv[1:]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # sys.argv may belong to another program (a notebook)
            same = vars(parser.parse_args(argv)) == vars(args)
    except SystemExit:
        same = False
    if same:
        return merge_config_file(parser, args, argv)
    defaults = vars(parser.parse_args([]))
    overlay = [(k, v) for k, v in vars(args).items() if k not in defaults or v != defaults[k]]
    merged = merge_config_file(parser, args, [])
    for key, value in overlay:
        setattr(merged, key, value)
    return merged
