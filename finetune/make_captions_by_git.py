"""Caption images with GIT (transformers GitForCausalLM) and write one caption file per image.

Same options as sd-scripts' finetune/make_captions_by_git.py. --model_id may be a hub id (needs network or the
hub cache) or a folder in transformers format; offline, download microsoft/git-large-textcaps into a folder
and pass the folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python finetune/x.py` from anywhere

from library.captioning.git import DEFAULT_MODEL_ID, run_make_captions_by_git  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", type=str, help="directory of the images to caption")
    parser.add_argument("--caption_extension", type=str, default=".caption", help="extension of the caption files")
    parser.add_argument("--model_id", type=str, default=DEFAULT_MODEL_ID,
                        help="GIT model: a hub id or a folder in transformers format (use a folder offline)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per inference")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="decode images with this many worker threads (faster); unreadable images are skipped")
    parser.add_argument("--max_length", type=int, default=50, help="maximum caption length in tokens")
    parser.add_argument("--remove_words", action="store_true",
                        help="remove text-reading phrases such as 'with the words xxx', 'that says xxx', "
                             "'with the number 5 on it' (sd-scripts' patterns; leftover spaces are tidied)")
    parser.add_argument("--debug", action="store_true", help="log each caption (and what --remove_words removed)")
    parser.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    add_logging_arguments(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    run_make_captions_by_git(args)


if __name__ == "__main__":
    main()
