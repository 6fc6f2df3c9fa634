"""Canny edges of an image, the conditioning image of a canny ControlNet (sd-scripts v0.8.7 `tools/canny.py`).

The image is read in colour, turned to grey and passed to OpenCV's `cv2.Canny(grey, thres1, thres2)`; the edge map
(white edges on black, one channel) is written to `--output` in the format its extension names. OpenCV is an
optional package: without it the tool says how to install it and exits with code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

import numpy as np  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.fileio import atomic_path  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402

logger = logging.getLogger(__name__)

INSTALL_HINT = "tools/canny.py needs OpenCV: pip install opencv-python-headless"


def import_cv2():
    """The `cv2` module, or the one line saying how to install it."""
    try:
        import cv2  # optional package
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return cv2


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=str, default=None, help="image to read (any format OpenCV reads)")
    parser.add_argument("--output", type=str, default=None,
                        help="edge image to write; its extension (.png, .jpg, ...) chooses the format")
    parser.add_argument("--thres1", type=int, default=32, help="lower hysteresis threshold of cv2.Canny (default 32)")
    parser.add_argument("--thres2", type=int, default=224,
                        help="upper hysteresis threshold of cv2.Canny (default 224)")
    add_logging_arguments(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """What can be wrong before any pixel is read."""
    if not args.input:
        raise UserError("--input is required (the image to read)")
    if not os.path.isfile(args.input):
        raise UserError(f"--input {args.input}: no such file")
    if not args.output:
        raise UserError("--output is required (the edge image to write)")
    if not os.path.splitext(args.output)[1]:
        raise UserError(f"--output {args.output}: needs an image extension (.png, .jpg, ...) to choose the format")
    for name in ("thres1", "thres2"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} {getattr(args, name)}: must be 0 or more")


def canny_edges(cv2, path: str, thres1: int, thres2: int) -> np.ndarray:
    """The (H, W) uint8 edge map of the image at `path` (read through a buffer: any path, any platform)."""
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"--input {path}: not an image OpenCV can read")
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.Canny(grey, thres1, thres2)


def write_image(cv2, image: np.ndarray, path: str) -> None:
    """Encode by the output's extension, then write through a temporary name."""
    try:
        ok, encoded = cv2.imencode(os.path.splitext(path)[1], image)
    except cv2.error:
        ok = False
    if not ok:
        raise UserError(f"--output {path}: OpenCV cannot write this image format")
    with atomic_path(path) as tmp:
        encoded.tofile(tmp)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    check_args(args)
    cv2 = import_cv2()
    write_image(cv2, canny_edges(cv2, args.input, args.thres1, args.thres2), args.output)
    logger.info("done! wrote %s", args.output)


if __name__ == "__main__":
    main()
