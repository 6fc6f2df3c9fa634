"""Merge `<image>.caption` files into a fine-tuning metadata JSON as `caption` (spec utilities §3)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python finetune/x.py` from anywhere

from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.tagging.metadata_json import merge_sidecars_into_metadata  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train_data_dir", type=str, help="directory of the training images")
    parser.add_argument("out_json", type=str, help="metadata file to write")
    parser.add_argument("--in_json", type=str, default=None,
                        help="metadata file to read (default: out_json if it exists, else a new file)")
    parser.add_argument("--caption_extension", type=str, default=".caption", help="extension of the caption files")
    parser.add_argument("--caption_extention", type=str, default=None,
                        help="legacy misspelled alias of --caption_extension (overrides it)")
    parser.add_argument("--full_path", action="store_true",
                        help="key entries by the image path instead of the file stem (several folders)")
    parser.add_argument("--recursive", action="store_true", help="include sub-folders (requires --full_path)")
    parser.add_argument("--debug", action="store_true", help="log each key and caption")
    add_logging_arguments(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention
    merge_sidecars_into_metadata(args.train_data_dir, args.out_json, args.in_json, "caption",
                                 args.caption_extension, args.full_path, args.recursive, args.debug)


if __name__ == "__main__":
    main()
