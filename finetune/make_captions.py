"""Caption images with BLIP and write one caption file per image (spec utilities §1).

The model runs through transformers (BlipForConditionalGeneration). sd-scripts' default --caption_weights URL
(the original BLIP .pth) is mapped to its transformers conversion Salesforce/blip-image-captioning-large;
offline, download that repository into a folder and pass the folder as --caption_weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python finetune/x.py` from anywhere

from library.captioning.blip import DEFAULT_CAPTION_WEIGHTS, DEFAULT_HUB_MODEL, run_make_captions  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.tagging.cli import resolve_caption_extension  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", type=str, help="directory of the images to caption")
    parser.add_argument("--caption_weights", type=str, default=DEFAULT_CAPTION_WEIGHTS,
                        help="BLIP captioning model: a folder in transformers format, or a hub id (needs network "
                             f"or the hub cache). The default (sd-scripts' original BLIP .pth URL) means "
                             f"{DEFAULT_HUB_MODEL}; original .pth files are not supported")
    parser.add_argument("--caption_extension", type=str, default=".caption", help="extension of the caption files")
    parser.add_argument("--caption_extention", type=str, default=None,
                        help="legacy misspelled alias of --caption_extension (overrides it)")
    parser.add_argument("--beam_search", action="store_true",
                        help="beam search (deterministic) instead of nucleus sampling")
    parser.add_argument("--num_beams", type=int, default=1, help="number of beams, used with --beam_search")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling probability mass")
    parser.add_argument("--max_length", type=int, default=75,
                        help="maximum caption length in tokens (the 4 prompt tokens included, as in BLIP)")
    parser.add_argument("--min_length", type=int, default=5,
                        help="minimum caption length in tokens (the 4 prompt tokens included, as in BLIP)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per inference")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="decode images with this many worker threads (faster); unreadable images are skipped")
    parser.add_argument("--seed", type=int, default=42, help="seed for torch, numpy and random (sampling)")
    parser.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    parser.add_argument("--debug", action="store_true", help="log each caption")
    add_logging_arguments(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    resolve_caption_extension(args)
    run_make_captions(args)


if __name__ == "__main__":
    main()
