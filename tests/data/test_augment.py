"""color_aug and face_crop_aug_range (spec dataset-config §9), values worked out by hand."""
import random

import numpy as np
import pytest

from library.data.augment import bgr_to_hsv, color_aug, face_crop, hsv_to_bgr, parse_face_info, shift_hue
from library.data.transforms import resize_area
from library.errors import UserError


def test_hsv_matches_opencv_integer_formula():
    # BGR (10,20,30): v = r = 30, diff = 20, h = g - b = 10
    #   hdiv[20] = round(180*4096 / 120) = 6144 -> (10*6144 + 2048) >> 12 = 15
    #   sdiv[30] = round(255*4096 / 30) = 34816 -> (20*34816 + 2048) >> 12 = 170
    # BGR (255,0,0): v = b, h = r - g + 4*diff = 1020; hdiv[255] = round(481.88) = 482
    #   (1020*482 + 2048) >> 12 = 120
    hsv = bgr_to_hsv(np.array([[[10, 20, 30], [255, 0, 0], [0, 255, 0], [7, 7, 7]]], np.uint8))
    assert hsv[0].tolist() == [[15, 170, 30], [120, 255, 255], [60, 255, 255], [0, 0, 7]]


def test_hsv_to_bgr_sectors():
    # h = 0 -> sector 0: (b, g, r) = (v(1-s), v(1-s(1-0)), v) = pure red in BGR order
    # h = 60 -> 2.0 -> sector 2: (t, v, p) with frac 0 -> t = v(1-s) = 0 -> green
    assert hsv_to_bgr(np.array([[[0, 255, 255], [60, 255, 255], [0, 0, 90]]], np.uint8))[0].tolist() == \
        [[0, 0, 255], [0, 255, 0], [90, 90, 90]]


def test_hue_shift_reads_rgb_as_bgr():
    # RGB red read as BGR is blue (h 120); +60 -> 0 = BGR red = RGB array (0, 0, 255)
    assert shift_hue(np.array([[[255, 0, 0]]], np.uint8), 60)[0, 0].tolist() == [0, 0, 255]
    # negative shift wraps: -60 -> 120 + 120 = 240 % 180 = 60 -> BGR green
    assert shift_hue(np.array([[[255, 0, 0]]], np.uint8), -60)[0, 0].tolist() == [0, 255, 0]
    grey = np.full((2, 2, 3), 77, np.uint8)
    assert np.array_equal(shift_hue(grey, 5.5), grey)


def test_color_aug_branches_follow_the_rng():
    image = np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.uint8)
    branches = set()
    for seed in range(40):
        rng = random.Random(seed)
        if rng.random() > 0.33:
            expected, branch = image, "none"
        elif rng.random() > 0.5:
            expected, branch = shift_hue(image, rng.uniform(-8, 8)), "hue"
        else:
            gamma = rng.uniform(0.95, 1.05)
            expected, branch = np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8), "gamma"
        assert np.array_equal(color_aug(image, random.Random(seed)), expected)
        branches.add(branch)
    assert branches == {"none", "hue", "gamma"}


def test_parse_face_info():
    assert parse_face_info("/d/img_10_20_30_40.png") == (10, 20, 30, 40)
    assert parse_face_info("/d/a_b.png") is None
    assert parse_face_info("/d/a_b_c_d_e.png") is None


def test_face_crop_centred_without_resize():
    image = np.random.RandomState(0).randint(0, 256, (800, 1000, 3)).astype(np.uint8)
    # f = 200, size 512, cover = max(512/800, 512/1000) = 0.64; smin = min(1, max(0.64, 512/400)) = 1
    # crop rows 400 - 256 = 144, columns 500 - 256 = 244 (lo == hi: no jitter)
    out = face_crop(image, (500, 400, 200, 200), (512, 512), (2.0, 2.0), False, random.Random(0))
    assert np.array_equal(out, image[144:656, 244:756])


def test_face_crop_scales_down():
    image = np.random.RandomState(0).randint(0, 256, (800, 1000, 3)).astype(np.uint8)
    # range (4, 4): smin = min(1, max(0.64, 512/800)) = 0.64 = smax -> 640x512, face at (320, 256)
    # rows 256 - 256 = 0; columns 320 - 256 = 64
    out = face_crop(image, (500, 400, 200, 200), (512, 512), (4.0, 4.0), False, random.Random(0))
    assert np.array_equal(out, resize_area(image, (640, 512))[:, 64:576])


def test_face_crop_small_image_is_a_user_error():
    with pytest.raises(UserError, match="image size is small"):
        face_crop(np.zeros((100, 100, 3), np.uint8), (50, 50, 20, 20), (512, 512), (2.0, 3.0), False,
                  random.Random(0))
