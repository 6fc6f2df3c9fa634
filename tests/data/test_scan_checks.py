"""What the dataset build refuses before training, and errors raised in DataLoader workers (issue 15).

Every refusal is checked against what training itself would do with the same image (decode, crop,
bucket), so the scan refuses exactly what would fail later and nothing more.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.dataset_blueprint import SubsetParams
from library.data.dataset import make_dataloader
from library.errors import UserError
from tests.data.dataset_helpers import build, db_params, make_folder, write_image


def _corrupt_inside(path) -> None:
    """Garble compressed data in the middle of a PNG: header and IEND intact, so only a decode sees it."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 100
    data[start:start + 50] = bytes(b ^ 0x5A for b in data[start:start + 50])
    path.write_bytes(bytes(data))


def _first_error(group, workers: int) -> UserError:
    with pytest.raises(UserError) as info:
        for _ in make_dataloader(group, workers, epoch=1):
            pass
    return info.value


def test_worker_error_reaches_the_main_process_as_itself(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64)] * 4)
    _corrupt_inside(folder / "img2.png")
    group = build([db_params([SubsetParams(image_dir=str(folder))], batch_size=1)])  # passes the cheap scan
    in_main = _first_error(group, 0)
    in_worker = _first_error(group, 2)
    assert type(in_worker) is UserError
    assert str(in_worker) == str(in_main)
    assert str(in_main).startswith("cannot read image ") and "img2.png" in str(in_main)
    assert "\n" not in str(in_worker) and "Traceback" not in str(in_worker)


def test_good_batches_pass_through_workers_unchanged(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64)] * 4)
    group = build([db_params([SubsetParams(image_dir=str(folder))], batch_size=2)])
    direct = [b["images"] for b in make_dataloader(group, 0, epoch=1)]
    workers = [b["images"] for b in make_dataloader(group, 2, epoch=1)]
    assert len(direct) == len(workers) == 2
    assert all(torch.equal(a, b) for a, b in zip(direct, workers))


def test_one_pixel_image_with_buckets_trains(tmp_path):
    write_image(tmp_path / "1_x" / "dot.png", 1, 1)
    pixel = np.asarray(Image.open(tmp_path / "1_x" / "dot.png").convert("RGB"))[0, 0]
    group = build([db_params([SubsetParams(image_dir=str(tmp_path / "1_x"))], batch_size=1)])
    images = group[0]["images"]
    assert images.shape == (1, 3, 64, 64)  # upscaled into the square bucket
    expected = torch.tensor(pixel / 255.0 * 2 - 1, dtype=torch.float32)
    assert torch.allclose(images[0, :, 0, 0], expected) and torch.equal(images.amin((2, 3)), images.amax((2, 3)))


def test_one_pixel_image_with_bucket_no_upscale_is_named(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64), (1, 1), (64, 1)])
    with pytest.raises(UserError) as info:
        build([db_params([SubsetParams(image_dir=str(folder))], bucket_no_upscale=True)])
    message = str(info.value)
    assert message.startswith("2 unbucketable images, first: ")
    assert "img1.png: image size 1x1" in message and "img2.png: image size 64x1" in message
    assert "img0.png" not in message


@pytest.mark.parametrize("random_crop", [False, True])
def test_sizes_that_cannot_fit_without_buckets(tmp_path, random_crop):
    sizes = [(64, 64), (32, 64), (1, 1), (96, 64), (64, 80), (63, 64), (64, 63), (70, 70)]
    folder = make_folder(tmp_path / "1_x", sizes)
    subset = SubsetParams(image_dir=str(folder), random_crop=random_crop)
    with pytest.raises(UserError) as info:
        build([db_params([subset], enable_bucket=False)])
    message = str(info.value)
    small = ["img1.png (32x64, too small)", "img2.png (1x1, too small)", "img5.png (63x64, too small)",
             "img6.png (64x63, too small)"]
    large = [] if random_crop else ["img3.png (96x64, too large)", "img4.png (64x80, too large)",
                                    "img7.png (70x70, too large)"]
    count = len(small) + len(large)
    assert message.startswith(f"{count} wrongly sized images, first: ")
    listed = [name for name in sorted(small + large) if name in message]
    assert len(listed) == min(5, count)
    assert (f" and {count - 5} more" in message) == (count > 5)
    assert "img0.png" not in message and "without buckets an image must be 64x64" in message


def test_larger_images_crop_with_random_crop(tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64), (96, 64), (70, 70)])
    group = build([db_params([SubsetParams(image_dir=str(folder), random_crop=True)], enable_bucket=False,
                             batch_size=3)])
    assert group[0]["images"].shape == (3, 3, 64, 64)


def test_whitespace_only_caption_is_a_warning_naming_the_file(tmp_path, caplog):
    folder = make_folder(tmp_path / "1_x", [(64, 64)] * 3, {0: "a dog", 1: "  \t ", 2: "\n\nsecond line"})
    with caplog.at_level(logging.WARNING, logger="library.data.discovery"):
        group = build([db_params([SubsetParams(image_dir=str(folder))])])
    warnings = [r.getMessage() for r in caplog.records if "whitespace-only caption" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 images" in warnings[0] and "img1.png" in warnings[0] and "img2.png" in warnings[0]
    assert "img0.png" not in warnings[0]
    assert sorted(i.caption for i in group.datasets[0].images) == ["", "", "a dog"]  # still trains

