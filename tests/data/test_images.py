"""Image discovery, sizes, decoding and up-front validation (spec dataset-config §4.1, §7.4)."""
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from library.data.images import find_images_for_key, glob_images, load_image, read_image_size, scan_images
from library.errors import UserError


def _rgb(width, height, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)


def _exif_jpeg(path, orientation, width=40, height=20):
    image = Image.fromarray(_rgb(width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)


def test_glob_non_recursive_and_recursive(tmp_path):
    for name in ["b.png", "a.JPG", "c.Png", "d.txt", ".hidden.png", "e.webp", "f.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.bmp").write_bytes(b"x")
    d = str(tmp_path)
    expected = [os.path.join(d, n) for n in ["a.JPG", "b.png", "e.webp", "f.jpeg"]]
    assert glob_images(d) == expected
    assert glob_images(d, recursive=True) == expected + [os.path.join(d, "sub", "g.bmp")]
    assert find_images_for_key(d, "b") == [os.path.join(d, "b.png")]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_applied_like_pil(tmp_path, orientation):
    path = str(tmp_path / "o.jpg")
    _exif_jpeg(path, orientation)
    with Image.open(path) as im:
        expected = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    got = load_image(path)
    assert np.array_equal(got, expected)
    assert read_image_size(path) == (got.shape[1], got.shape[0])
    assert read_image_size(path) == ((20, 40) if orientation in (6, 8) else (40, 20))


def test_modes(tmp_path):
    grey = np.full((4, 6), 100, np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    assert np.array_equal(load_image(str(tmp_path / "l.png")), np.full((4, 6, 3), 100, np.uint8))

    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 50
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    rgb = load_image(str(tmp_path / "rgba.png"))
    assert rgb.shape == (4, 6, 3) and (rgb[..., 0] == 200).all()  # alpha dropped, not composited
    with_alpha = load_image(str(tmp_path / "rgba.png"), alpha=True)
    assert with_alpha.shape == (4, 6, 4) and (with_alpha[..., 3] == 50).all()

    Image.fromarray(np.stack([grey, np.full_like(grey, 7)], -1), "LA").save(tmp_path / "la.png")
    assert load_image(str(tmp_path / "la.png"), alpha=True)[0, 0].tolist() == [100, 100, 100, 7]

    palette = Image.fromarray(grey, "L").convert("P")
    palette.save(tmp_path / "p.png")
    assert load_image(str(tmp_path / "p.png"))[0, 0].tolist() == [100, 100, 100]

    assert load_image(str(tmp_path / "l.png"), alpha=True)[0, 0].tolist() == [100, 100, 100, 255]


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128 * 257, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert load_image(str(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 128, 255]


def test_header_sizes_equal_decoded_sizes(tmp_path):
    paths = []
    for ext, size in [(".png", (31, 17)), (".webp", (20, 33)), (".bmp", (9, 5)), (".jpg", (64, 48))]:
        path = str(tmp_path / f"i{ext}")
        Image.fromarray(_rgb(*size)).save(path)
        paths.append(path)
    rotated = str(tmp_path / "rot.jpg")
    _exif_jpeg(rotated, 6, 50, 30)
    paths.append(rotated)
    sizes = scan_images(paths)
    for path in paths:
        decoded = load_image(path)
        assert read_image_size(path) == (decoded.shape[1], decoded.shape[0]) == sizes[path]


def test_scan_reports_bad_files_in_one_error(tmp_path):
    good = str(tmp_path / "good.png")
    Image.fromarray(_rgb(64, 64)).save(good)
    truncated = str(tmp_path / "truncated.png")
    data = open(good, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    text = str(tmp_path / "text.png")
    open(text, "w").write("not an image")
    with pytest.raises(UserError) as info:
        scan_images([good, truncated, text])
    message = str(info.value)
    assert message.startswith("2 unreadable images, first: ")
    assert truncated in message and text in message and good + " " not in message
    assert "cannot identify image file" in message


def test_load_error_names_the_file(tmp_path):
    text = str(tmp_path / "text.png")
    open(text, "w").write("not an image")
    with pytest.raises(UserError, match="text.png"):
        load_image(text)
    with pytest.raises(UserError, match="text.png"):
        read_image_size(text)
