"""Merge `<image>.caption` files into a fine-tuning metadata JSON as `caption` (spec utilities §3)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python finetune/x.py` from anywhere

from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.tagging.cli import add_metadata_merge_arguments, resolve_caption_extension  # noqa: E402
from library.tagging.metadata_json import merge_sidecars_into_metadata  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_metadata_merge_arguments(parser, "caption", ".caption", legacy_alias=True)
    add_logging_arguments(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    resolve_caption_extension(args)
    merge_sidecars_into_metadata(args.train_data_dir, args.out_json, args.in_json, "caption",
                                 args.caption_extension, args.full_path, args.recursive, args.debug)


if __name__ == "__main__":
    main()
