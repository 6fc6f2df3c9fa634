"""Clean the `tags` and `caption` of every entry of a fine-tuning metadata JSON (spec utilities §5)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python finetune/x.py` from anywhere

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.tagging.clean_rules import clean_metadata  # noqa: E402
from library.tagging.metadata_json import read_metadata, write_metadata  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("in_json", type=str, help="metadata file to read")
    parser.add_argument("out_json", type=str, help="metadata file to write")
    parser.add_argument("--debug", action="store_true", help="log every changed tag string and caption")
    add_logging_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and set up logging. Two positionals; the legacy form `train_data_dir in_json out_json` is accepted with a warning."""
    args, unknown = setup_parser().parse_known_args(argv)
    setup_logging_from_args(args)
    if len(unknown) == 1 and not unknown[0].startswith("-"):
        logger.warning("the train_data_dir argument is no longer used: give only in_json and out_json "
                       "(all captions and tags in the metadata are processed)")
        args.in_json, args.out_json = args.out_json, unknown[0]
    elif unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)}")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # sd-scripts prints a message and exits 0 when in_json is missing; a missing input is an error here
    metadata = read_metadata(args.in_json)
    logger.info("cleaning captions and tags.")
    write_metadata(args.out_json, clean_metadata(metadata, args.debug))
    logger.info("done!")


if __name__ == "__main__":
    main()
