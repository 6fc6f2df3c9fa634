#!/usr/bin/env python
"""sd-scripts v0.8.7's ``tools/detect_face_rotate.py`` (anime-face crop / rotate / resize) is not provided: its
options parse as upstream's, then it says what it would need and exits 2.

Upstream runs hysts' ``anime_face_detector`` (``create_detector('yolov3')``: mmcv-full, mmdet and mmpose), which
downloads two checkpoints from github.com/hysts/anime-face-detector/releases (v0.0.1) on first use:
``mmdet_anime-face_yolov3.pth`` (faces) and ``mmpose_anime-face_hrnetv2.pth`` (landmarks). Nothing in this
project may need a download at run time (docs/compatibility.md lists the tool with what stays unsupported).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

from library.errors import UserError, exit_on_user_error  # noqa: E402

MESSAGE = ("tools/detect_face_rotate.py is not supported: it needs the anime_face_detector package (with mmcv-full, "
           "mmdet, mmpose) and its models mmdet_anime-face_yolov3.pth and mmpose_anime-face_hrnetv2.pth downloaded "
           "from github.com/hysts/anime-face-detector releases (see docs/compatibility.md)")


def setup_parser() -> argparse.ArgumentParser:
    """Upstream's options, so a command line written for it parses (and then gets the one-line refusal)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src_dir", type=str, help="directory to load images from")
    parser.add_argument("--dst_dir", type=str, help="directory to save images to")
    parser.add_argument("--rotate", action="store_true", help="rotate images so that faces are upright")
    parser.add_argument("--resize_fit", action="store_true",
                        help="after cropping, resize so that the shorter side fits --crop_size")
    parser.add_argument("--resize_face_size", type=int, default=None,
                        help="before cropping, resize so that the face has this size")
    parser.add_argument("--crop_size", type=str, default=None, help="crop 'width,height' pixels around the face")
    parser.add_argument("--crop_ratio", type=str, default=None,
                        help="crop 'horizontal,vertical' times the face size around the face")
    parser.add_argument("--min_size", type=int, default=None, help="smallest face size to output (included)")
    parser.add_argument("--max_size", type=int, default=None, help="largest face size to output (excluded)")
    parser.add_argument("--multiple_faces", action="store_true", help="output every face found, one file each")
    parser.add_argument("--debug", action="store_true", help="draw the face rectangle on the output")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    setup_parser().parse_args(argv)  # bad options are argparse's usual error first
    raise UserError(MESSAGE)


if __name__ == "__main__":
    main()
