#!/usr/bin/env python
"""Draw the 'shapes' world: one coloured shape per image, captioned "a red circle".

    python tools/make_shapes_dataset.py --out data/shapes --n 1000 --holdout diagonal
    -> data/shapes/1_shapes/00000.png + 00000.caption ...   (DreamBooth: --train_data_dir data/shapes)
       data/shapes/metadata.json                           (fine-tuning: --in_json, images in 1_shapes/)

The same --seed always gives the same images; image i does not depend on --n.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.shapes import world  # noqa: E402


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"64x64,80x48"`` -> ``[(64, 64), (80, 48)]`` (width x height, multiples of 8)."""
    sizes = []
    for item in _names(text):
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise UserError(f"--sizes: bad size {item!r} (want WIDTHxHEIGHT, e.g. 64x64)") from None
        if w < 16 or h < 16 or w % 8 or h % 8:
            raise UserError(f"--sizes: {item} must be at least 16 and a multiple of 8 on both sides")
        sizes.append((w, h))
    if not sizes:
        raise UserError("--sizes: no sizes given")
    return sizes


def resolve_holdout(text: str | None, colors: list[str], shapes: list[str]) -> list[world.Pair]:
    """``--holdout``: ``diagonal`` / ``diagonal:K`` (a Latin diagonal, offset K) or ``red:circle,...``."""
    if not text:
        return []
    if text.startswith("diagonal"):
        offset = int(text.split(":", 1)[1]) if ":" in text else 0
        return world.diagonal_holdout(colors, shapes, offset)
    return world.parse_pairs(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=500, help="number of images (default 500)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--shapes", default=",".join(world.BASE_SHAPES),
                   help=f"comma list from {', '.join(world.SHAPE_POLYGONS)} (default: the base world, "
                        f"without the new concept '{world.NEW_SHAPE}')")
    p.add_argument("--colors", default=",".join(world.BASE_COLORS),
                   help=f"comma list from {', '.join(world.PALETTE)} (default {','.join(world.BASE_COLORS)})")
    p.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in world.SIZES),
                   help="canvas sizes WIDTHxHEIGHT (default 64x64,80x48,48x80)")
    p.add_argument("--format", choices=["dreambooth", "finetune", "both"], default="both",
                   help="caption files, metadata JSON, or both (default both)")
    p.add_argument("--repeats", type=int, default=1, help="repeats in the folder name <repeats>_<name> (default 1)")
    p.add_argument("--name", default="shapes", help="folder name after the repeats (default shapes)")
    p.add_argument("--holdout", default=None,
                   help="colour x shape pairs kept out: 'diagonal', 'diagonal:K' or 'red:circle,blue:star'")
    p.add_argument("--split", choices=["all", "train", "holdout"], default=None,
                   help="which pairs to draw (default: train when --holdout is given, else all)")
    p.add_argument("--start", type=int, default=0, help="index of the first image (default 0)")
    p.add_argument("--prompt_file", default=None,
                   help="also write a gen_img prompt file with every pair of the split (--prompts_per_pair each)")
    p.add_argument("--prompts_per_pair", type=int, default=1, help="prompt lines per pair (default 1)")
    add_logging_arguments(p)
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, str]:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    if args.n < 1:
        raise UserError(f"--n must be at least 1 (got {args.n})")
    colors, shapes, sizes = _names(args.colors), _names(args.shapes), parse_sizes(args.sizes)
    split = args.split or ("train" if args.holdout else "all")
    try:
        holdout = resolve_holdout(args.holdout, colors, shapes)
        world.check_names(colors, shapes)
        pairs = world.split_pairs(colors, shapes, holdout, split)
    except ValueError as e:
        raise UserError(f"--colors/--shapes/--holdout: {e}") from None
    samples = world.generate(args.n, args.seed, colors, shapes, sizes, holdout, split, args.start)
    from tqdm import tqdm

    written = world.write_dataset(tqdm(samples, total=args.n, desc="drawing"), args.out, args.format,
                                  args.repeats, args.name)
    if args.prompt_file:
        from library.fileio import write_text_atomic

        lines = world.prompt_lines(pairs, args.prompts_per_pair, args.seed, sizes)
        write_text_atomic(args.prompt_file, "\n".join(lines) + "\n")
        written["prompt_file"] = args.prompt_file
    if holdout:
        print("held out: " + ", ".join(f"{c}:{s}" for c, s in holdout))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written


if __name__ == "__main__":
    main()
