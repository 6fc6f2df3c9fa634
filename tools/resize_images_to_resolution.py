"""Shrink every image of a folder to one or more maximum areas, keeping the aspect ratio (spec utilities §13).

Resampling is Pillow's (this project has no OpenCV): `area` → BOX (OpenCV INTER_AREA's box average),
`cubic` → BICUBIC, `lanczos4` → LANCZOS (Pillow's Lanczos has a 3-lobe kernel, OpenCV's 4; Pillow also
antialiases when shrinking, OpenCV's cubic/lanczos do not), so pixels differ slightly from sd-scripts;
sizes, names and crops are identical.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

from PIL import Image  # noqa: E402

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.fileio import atomic_path  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # case-sensitive, as sd-scripts
INTERPOLATIONS = {"area": Image.Resampling.BOX, "cubic": Image.Resampling.BICUBIC,
                  "lanczos4": Image.Resampling.LANCZOS}


def parse_resolutions(text: str) -> list[tuple[str, int, int]]:
    """`"512x512,384x384"` → [("512x512", 512, 512), …]; the label is used verbatim in output names."""
    out = []
    for label in (r.strip() for r in text.split(",")):
        try:
            w, h = (int(v) for v in label.split("x"))
        except ValueError:
            raise UserError(f"--max_resolution entries must be WxH like 512x512, got {label!r}") from None
        if w < 1 or h < 1:
            raise UserError(f"--max_resolution entries must be positive, got {label!r}")
        out.append((label, w, h))
    return out


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Size after shrinking to at most `max_pixels` (both sides × √ratio, floored); unchanged if it fits."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return int(width * scale), int(height * scale)


def center_crop_to_multiple(image: Image.Image, width: int, height: int, divisible_by: int) -> Image.Image:
    """Centre-crop to (width, height) floored to multiples of `divisible_by`."""
    w, h = width - width % divisible_by, height - height % divisible_by
    x, y = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((x, y, x + w, y + h))


def _save(image: Image.Image, path: Path, as_png: bool) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG" if as_png else "JPEG", quality=100)


def resize_one(src: Path, dst_dir: Path, resolutions: list[tuple[str, int, int]], divisible_by: int,
               resample: Image.Resampling, save_as_png: bool) -> None:
    """Resize one image successively for each resolution (each step starts from the previous result)."""
    with Image.open(src) as opened:
        image = opened.convert("RGB")
    for label, max_w, max_h in resolutions:
        before = image.width * image.height
        new_w, new_h = fit_size(image.width, image.height, max_w * max_h)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample)
        image = center_crop_to_multiple(image, new_w, new_h, divisible_by)
        if image.width < 1 or image.height < 1:
            logger.warning(f"{src.name} is too thin for {label}: skipped from here on")
            return
        new_name = f"{src.stem}+{label}{'.png' if save_as_png else '.jpg'}"
        _save(image, dst_dir / new_name, save_as_png)
        proc = "Resized" if before > max_w * max_h else "Saved"
        logger.info(f"{proc} image: {src.name} with size {image.height}x{image.width} as {new_name}")


def copy_associated(src_dir: Path, dst_dir: Path, stem: str, labels: list[str]) -> None:
    """Copy `<stem>.*` non-image files as `<stem>+<WxH><ext>` for each resolution."""
    for name in sorted(os.listdir(src_dir)):
        ext = os.path.splitext(name)[1]
        if not name.startswith(stem + ".") or ext in IMAGE_EXTENSIONS or not (src_dir / name).is_file():
            continue
        for label in labels:
            logger.info(f"Copy {name} as {stem}+{label}{ext}")
            shutil.copy(src_dir / name, dst_dir / f"{stem}+{label}{ext}")


def resize_images(src_img_folder: str, dst_img_folder: str, max_resolution: str = "512x512",
                  divisible_by: int = 2, interpolation: str = "area", save_as_png: bool = False,
                  copy_associated_files: bool = False) -> None:
    """The whole tool; function defaults are sd-scripts' (divisible_by=2 here, 1 on the command line)."""
    src, dst = Path(src_img_folder), Path(dst_img_folder)
    if not src.is_dir():
        raise UserError(f"source folder not found: {src}")
    if divisible_by < 1:
        raise UserError(f"--divisible_by must be at least 1, got {divisible_by}")
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    resolutions = parse_resolutions(max_resolution)
    dst.mkdir(parents=True, exist_ok=True)
    for filename in os.listdir(src):
        path = src / filename
        if path.is_dir():
            logger.info(f"sub-folder not processed: {path}")
            continue
        if not filename.endswith(IMAGE_EXTENSIONS):
            shutil.copy(path, dst / filename)  # captions and other files travel unchanged
            continue
        try:
            resize_one(path, dst, resolutions, divisible_by, INTERPOLATIONS[interpolation], save_as_png)
        except OSError as e:  # undecodable image (sd-scripts stops here): skip it, keep the others
            logger.warning(f"Could not load image, skipped: {path} ({e})")
            continue
        if copy_associated_files:
            copy_associated(src, dst, os.path.splitext(filename)[0], [r[0] for r in resolutions])


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src_img_folder", type=str, help="folder with the source images")
    parser.add_argument("dst_img_folder", type=str, help="folder for the resized images (created)")
    parser.add_argument("--max_resolution", type=str, default="512x512,384x384,256x256,128x128",
                        help="maximum area(s) as 'WxH,WxH,…'; each one is applied to the previous result")
    parser.add_argument("--divisible_by", type=int, default=1,
                        help="centre-crop both sides to multiples of this value")
    parser.add_argument("--interpolation", type=str, choices=list(INTERPOLATIONS), default="area",
                        help="resampling: area (Pillow BOX), cubic (BICUBIC), lanczos4 (Pillow LANCZOS)")
    parser.add_argument("--save_as_png", action="store_true", help="save PNG instead of JPEG (quality 100)")
    parser.add_argument("--copy_associated_files", action="store_true",
                        help="also copy files sharing an image's stem (captions…) as <stem>+<WxH><ext>")
    add_logging_arguments(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging_from_args(args)
    resize_images(args.src_img_folder, args.dst_img_folder, args.max_resolution, args.divisible_by,
                  args.interpolation, args.save_as_png, args.copy_associated_files)


if __name__ == "__main__":
    main()
