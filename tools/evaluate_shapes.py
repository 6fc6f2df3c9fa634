#!/usr/bin/env python
"""Judge images of the 'shapes' world: which colour and shape does each show, and does it match its prompt?

    python tools/evaluate_shapes.py outputs/                   # prompts from gen_img's PNG text
    python tools/evaluate_shapes.py outputs/ --prompts map.json  # {"file.png": "a red circle", ...}
    python tools/evaluate_shapes.py outputs/ --alias sks=heart   # a LoRA's trigger word stands for a shape

No learned model: the foreground is separated from a plane fitted to the border, colour is the nearest
palette colour in Lab, shape the nearest calibrated centre of size-free geometric features
(library/shapes/evaluate.py). Prints one line per image and the accuracies; --json writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.data.images import glob_images  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.shapes import evaluate, world  # noqa: E402



def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def find_images(paths: list[str]) -> list[str]:
    """Image files named directly or found (not recursively) in named folders, sorted."""
    found = []
    for p in paths:
        if os.path.isdir(p):
            found += glob_images(p)
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    if not found:
        raise UserError(f"no images found in {', '.join(paths)}")
    return found


def load_prompt_map(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--prompts {path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise UserError(f"--prompts {path}: expected an object mapping file names to prompts")
    return data


def pair_images(images: list[str], prompt_map: dict[str, str] | None) -> list[tuple[str, str]]:
    """(image, prompt) for every image; the mapping is looked up by path, then by file name."""
    items = []
    for path in images:
        if prompt_map is not None:
            prompt = prompt_map.get(path, prompt_map.get(os.path.basename(path)))
        else:
            prompt = evaluate.prompt_of(path)
        if prompt is None:
            raise UserError(f"{path}: no prompt (no PNG 'prompt' text, no caption file, not in --prompts)")
        items.append((path, prompt))
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="images or folders of images")
    p.add_argument("--prompts", default=None, help="JSON mapping image file name (or path) to its prompt")
    p.add_argument("--colors", default=",".join(evaluate.EVAL_COLORS),
                   help=f"colours the classifier may answer (default {','.join(evaluate.EVAL_COLORS)})")
    p.add_argument("--shapes", default=",".join(evaluate.EVAL_SHAPES),
                   help=f"shapes the classifier may answer (default {','.join(evaluate.EVAL_SHAPES)})")
    p.add_argument("--alias", action="append", default=[],
                   help="WORD=SHAPE: a trigger word in prompts that stands for a shape (repeatable)")
    p.add_argument("--json", default=None, help="write the per-image results and the summary here")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    add_logging_arguments(p)
    return p


def _aliases(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        word, _, shape = item.partition("=")
        if not word or shape not in world.SHAPE_POLYGONS:
            raise UserError(f"--alias {item!r}: want WORD=SHAPE with a known shape ({', '.join(world.SHAPE_POLYGONS)})")
        out[word.lower()] = shape
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    colors, shapes = _names(args.colors), _names(args.shapes)
    try:
        world.check_names(colors, shapes)
    except ValueError as e:
        raise UserError(f"--colors/--shapes: {e}") from None
    prompt_map = load_prompt_map(args.prompts) if args.prompts else None
    items = pair_images(find_images(args.paths), prompt_map)
    results = evaluate.evaluate_images(items, colors, shapes, _aliases(args.alias))
    summary = evaluate.summarize(results)
    if not args.quiet:
        for r in results:
            p = r.prediction
            mark = "ok " if r.ok else "BAD"
            print(f"{mark} {os.path.basename(r.path)}: want {r.want_color} {r.want_shape}, saw {p.color} "
                  f"({p.color_confidence:.2f}) {p.shape} ({p.shape_confidence:.2f})")
    print(f"{summary['n']} images: colour {summary['color_accuracy']:.1%}, shape {summary['shape_accuracy']:.1%}, "
          f"prompt {summary['prompt_accuracy']:.1%}")
    if args.json:
        from library.fileio import write_text_atomic

        rows = [{"path": r.path, "prompt": r.prompt, "want": [r.want_color, r.want_shape],
                 "color": r.prediction.color, "shape": r.prediction.shape, "ok": r.ok,
                 "color_confidence": r.prediction.color_confidence,
                 "shape_confidence": r.prediction.shape_confidence} for r in results]
        write_text_atomic(args.json, json.dumps({"summary": summary, "images": rows}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
