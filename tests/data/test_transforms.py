"""Area resize, bucket crop, no-bucket crop, flip and normalisation (spec dataset-config §7.3-7.4)."""
import random

import numpy as np
import pytest
import torch

from library.data.augment import face_crop
from library.data.transforms import crop_without_bucket, flip_horizontal, no_bucket_misfit, resize_area, to_tensor, \
    trim_and_resize
from library.errors import UserError


def _row(values):
    return np.array([values], np.uint8)[..., None]  # (1, W, 1)


def test_area_downscale_integer_is_block_mean():
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
    # blocks: (0,10,40,50) -> 25, (20,30,60,70) -> 45, (80,90,120,130) -> 105, (100,110,140,150) -> 125
    assert resize_area(image, (2, 2))[..., 0].tolist() == [[25, 45], [105, 125]]


def test_area_downscale_fractional_coverage():
    # 3 -> 2, each output covers 1.5 inputs: (0 + 0.5*30)/1.5 = 10, (0.5*30 + 60)/1.5 = 50
    assert resize_area(_row([0, 30, 60]), (2, 1))[0, :, 0].tolist() == [10, 50]


def test_area_upscale_replicates_and_blends_at_edges():
    # 2 -> 4: pure replication; 2 -> 3: [a, (a+b)/2, b]
    assert resize_area(_row([0, 100]), (4, 1))[0, :, 0].tolist() == [0, 0, 100, 100]
    assert resize_area(_row([0, 100]), (3, 1))[0, :, 0].tolist() == [0, 50, 100]


def test_trim_and_resize_centre_crop():
    image = np.random.RandomState(0).randint(0, 256, (768, 1024, 3)).astype(np.uint8)
    out, original, ltrb = trim_and_resize(image, (576, 448), (597, 448), False, random.Random(0))
    assert out.shape == (448, 576, 3)
    assert original == (1024, 768)
    # excess width 597 - 576 = 21 -> offset 21 // 2 = 10
    assert np.array_equal(out, resize_area(image, (597, 448))[:, 10:586])
    assert ltrb == pytest.approx((0, 8, 576, 440))


def test_trim_and_resize_random_crop_uses_rng():
    image = np.random.RandomState(1).randint(0, 256, (40, 100, 3)).astype(np.uint8)
    out, _, _ = trim_and_resize(image, (64, 32), (100, 40), True, random.Random(5))
    rng = random.Random(5)
    left, top = rng.randint(0, 36), rng.randint(0, 8)  # width first, then height
    assert np.array_equal(out, image[top:top + 32, left:left + 64])


def test_no_bucket_crop_rules():
    rng = random.Random(0)
    exact = np.zeros((32, 64, 3), np.uint8)
    assert crop_without_bucket(exact, (64, 32), False, rng) is exact
    big = np.zeros((40, 70, 3), np.uint8)
    with pytest.raises(UserError, match="image too large.*x.png"):
        crop_without_bucket(big, (64, 32), False, rng, "x.png")
    assert crop_without_bucket(big, (64, 32), True, rng).shape == (32, 64, 3)
    with pytest.raises(UserError, match="image size is small"):
        crop_without_bucket(np.zeros((16, 64, 3), np.uint8), (64, 32), True, rng)


def _fits(image, target, random_crop, face) -> bool:
    """What training does with the image on the no-bucket path: True unless it raises."""
    rng = random.Random(0)
    try:
        if face is not None:
            image = face_crop(image, face, target, (2.0, 3.0), random_crop, rng)
        crop_without_bucket(image, target, random_crop, rng)
    except UserError:
        return False
    return True


@pytest.mark.parametrize("random_crop, with_face", [(False, False), (True, False), (False, True), (True, True)])
def test_no_bucket_misfit_is_exactly_when_the_crop_fails(random_crop, with_face):
    target = (8, 6)
    for width in range(1, 13):
        for height in range(1, 11):
            face = (width // 2 + 1, height // 2 + 1, 2, 2) if with_face else None
            image = np.zeros((height, width, 3), np.uint8)
            misfit = no_bucket_misfit((width, height), target, random_crop or with_face)
            assert (misfit is None) == _fits(image, target, random_crop, face), (width, height)
            if misfit == "too large":
                assert width > 8 or height > 6


def test_flip_and_tensor():
    image = np.array([[[0, 51, 255], [255, 255, 255]]], np.uint8)  # (1, 2, 3)
    flipped = flip_horizontal(image)
    assert flipped[0, 0].tolist() == [255, 255, 255] and flipped.flags["C_CONTIGUOUS"]
    tensor = to_tensor(image)
    assert tensor.shape == (3, 1, 2) and tensor.dtype == torch.float32
    # ToTensor (x/255) then Normalize(0.5, 0.5): 0 -> -1, 51 -> -0.6, 255 -> 1
    assert tensor[:, 0, 0].tolist() == pytest.approx([-1.0, -0.6, 1.0])
