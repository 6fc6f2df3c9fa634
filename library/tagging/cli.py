"""Option helpers shared by the captioning / tagging / metadata scripts (spec utilities §1-§4)."""
from __future__ import annotations

import argparse


def add_caption_extension_arguments(parser: argparse.ArgumentParser, default: str, legacy_alias: bool = True) -> None:
    """``--caption_extension`` and sd-scripts' misspelt ``--caption_extention`` alias (which wins when given)."""
    parser.add_argument("--caption_extension", type=str, default=default,
                        help=f"extension of the caption / tag files (default {default})")
    if legacy_alias:
        parser.add_argument("--caption_extention", type=str, default=None,
                            help="legacy misspelled alias of --caption_extension (overrides it)")


def resolve_caption_extension(args: argparse.Namespace) -> argparse.Namespace:
    if getattr(args, "caption_extention", None) is not None:
        args.caption_extension = args.caption_extention
    return args


def add_metadata_merge_arguments(parser: argparse.ArgumentParser, what: str, default_ext: str,
                                 legacy_alias: bool) -> None:
    """Options of merge_captions_to_metadata.py / merge_dd_tags_to_metadata.py (spec utilities §3, §4)."""
    parser.add_argument("train_data_dir", type=str, help="directory of the training images")
    parser.add_argument("out_json", type=str, help="metadata file to write")
    parser.add_argument("--in_json", type=str, default=None,
                        help="metadata file to read (default: out_json if it exists, else a new file)")
    add_caption_extension_arguments(parser, default_ext, legacy_alias)
    parser.add_argument("--full_path", action="store_true",
                        help="key entries by the image path instead of the file stem (several folders)")
    parser.add_argument("--recursive", action="store_true", help="include sub-folders (requires --full_path)")
    parser.add_argument("--debug", action="store_true", help=f"log each key and its {what}")
