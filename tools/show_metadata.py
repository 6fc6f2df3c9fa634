"""Print the metadata of a .safetensors file as sorted, indented JSON (spec utilities §15)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402

logger = logging.getLogger(__name__)


def read_safetensors_metadata(path: str) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors header (None when absent); only the header is read."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"model file not found: {path}")
    try:
        with safe_open(path, framework="np") as f:
            return f.metadata()
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(f"{path} is not a readable .safetensors file: {e}") from e


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=str, required=True, help=".safetensors file to inspect")
    add_logging_arguments(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    metadata = read_safetensors_metadata(args.model)
    if metadata is None:
        logger.error("No metadata found")
    else:
        print(json.dumps(metadata, indent=4, sort_keys=True))


if __name__ == "__main__":
    main()
