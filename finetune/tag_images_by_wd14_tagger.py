"""Tag images with a WD14 tagger (ONNX Runtime) and write one tag file per image (spec utilities §2)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python finetune/x.py` from anywhere

from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.tagging.cli import resolve_caption_extension  # noqa: E402
from library.tagging.tagger import run_tagger  # noqa: E402
from library.tagging.wd14 import DEFAULT_WD14_TAGGER_REPO  # noqa: E402


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train_data_dir", type=str, help="directory of the images to tag")
    parser.add_argument("--repo_id", type=str, default=DEFAULT_WD14_TAGGER_REPO,
                        help="Hugging Face repo of the tagger (v2 or v3, e.g. SmilingWolf/wd-swinv2-tagger-v3)")
    parser.add_argument("--model_dir", type=str, default="wd14_tagger_model",
                        help="model cache root: files live in <model_dir>/<repo_id with '/' -> '_'>/ "
                             "(model.onnx, selected_tags.csv); downloaded only if that folder is missing")
    parser.add_argument("--force_download", action="store_true",
                        help="download the model files again even if the folder exists (needs network)")
    parser.add_argument("--onnx", action="store_true",
                        help="use ONNX Runtime; accepted for compatibility: ONNX is this tool's only backend, "
                             "so it is always on (the TensorFlow backend of sd-scripts is not provided)")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="images per inference; a model with a fixed batch dimension overrides it (warning)")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="decode images with this many worker threads (faster); unreadable images are skipped")
    parser.add_argument("--caption_extension", type=str, default=".txt", help="extension of the written tag files")
    parser.add_argument("--caption_extention", type=str, default=None,
                        help="legacy misspelled alias of --caption_extension (overrides it)")
    parser.add_argument("--recursive", action="store_true", help="also tag images in sub-folders")
    parser.add_argument("--debug", action="store_true", help="log rating, character and general tags per image")
    parser.add_argument("--frequency_tags", action="store_true", help="print tag frequencies at the end")


def _add_tag_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--thresh", type=float, default=0.35, help="confidence threshold to output a tag")
    parser.add_argument("--general_threshold", type=float, default=None,
                        help="threshold for general tags (default: --thresh)")
    parser.add_argument("--character_threshold", type=float, default=None,
                        help="threshold for character tags (default: --thresh)")
    parser.add_argument("--remove_underscore", action="store_true",
                        help="replace '_' with a space in tags longer than 3 characters (keeps ^_^)")
    parser.add_argument("--undesired_tags", type=str, default="",
                        help="tags never output, separated by --caption_separator (without its spaces)")
    parser.add_argument("--append_tags", action="store_true",
                        help="merge with an existing tag file: its tags first, then new ones not present")
    parser.add_argument("--use_rating_tags", action="store_true", help="put the most likely rating tag first")
    parser.add_argument("--use_rating_tags_as_last_tag", action="store_true",
                        help="put the most likely rating tag last (with --use_rating_tags: first wins)")
    parser.add_argument("--character_tags_first", action="store_true",
                        help="insert character tags at the front (they end up in reverse CSV order)")
    parser.add_argument("--always_first_tags", type=str, default=None,
                        help="tags moved to the front when present, e.g. '1girl,1boy' (the last listed ends up "
                             "first); entries are NOT stripped, so write them without spaces")
    parser.add_argument("--caption_separator", type=str, default=", ",
                        help="separator between tags in the output, spaces included")
    parser.add_argument("--tag_replacement", type=str, default=None,
                        help="replace tags: 'source1,target1;source2,target2'; escape literal ',' and ';' as '\\,' '\\;'")
    parser.add_argument("--character_tag_expand", action="store_true",
                        help="split 'name_(series)' character tags into 'name' and 'series'")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    _add_model_arguments(parser)
    _add_tag_arguments(parser)
    add_logging_arguments(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    resolve_caption_extension(args)
    run_tagger(args)


if __name__ == "__main__":
    main()
