"""The header scan's end-of-file check: truncated files are refused before training, complete ones pass.

Oracle: Pillow's own full decode of the file (what a DataLoader worker would do), never our code.
"""
import numpy as np
import pytest
from PIL import Image

from library.data.image_info import read_sizes
from library.data.images import read_image_size
from library.data.integrity import TAIL_BYTES, looks_complete
from library.errors import UserError

FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP")]


def _write(path, size=(128, 96)):
    pixels = np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


def _pillow_decodes(path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
    except Exception:
        return False
    return True


def _complete(path) -> bool:
    with open(path, "rb") as f, Image.open(f) as image:
        return looks_complete(image.format, f)


@pytest.mark.parametrize("ext, fmt", FORMATS)
def test_complete_files_pass_the_cheap_check(tmp_path, ext, fmt):
    path = tmp_path / f"a.{ext}"
    _write(path)
    assert _complete(path)
    assert read_image_size(str(path)) == (128, 96)


@pytest.mark.parametrize("ext, fmt", FORMATS)
def test_truncated_files_are_refused_exactly_when_pillow_cannot_decode_them(tmp_path, ext, fmt):
    data = _write(tmp_path / f"full.{ext}")
    refused = 0
    for cut in (1, 2, 13, 100, len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        path = tmp_path / f"cut{cut}.{ext}"
        path.write_bytes(data[:-cut])
        decodes = _pillow_decodes(path)
        try:
            read_image_size(str(path))
            passed = True
        except UserError as e:
            assert str(path) in str(e)
            passed = False
        assert passed == decodes, cut
        refused += not passed
    assert refused >= 4  # every cut into the pixel data


@pytest.mark.parametrize("ext, fmt", [("png", "PNG"), ("jpg", "JPEG")])
def test_data_after_the_end_marker_is_not_an_error(tmp_path, ext, fmt):
    data = _write(tmp_path / f"a.{ext}")
    padded = tmp_path / f"padded.{ext}"
    padded.write_bytes(data + b"\0" * 64)  # padding: the marker is still in the tail
    assert _complete(padded)
    trailer = tmp_path / f"trailer.{ext}"
    trailer.write_bytes(data + b"ftyp" * TAIL_BYTES)  # a camera trailer: suspect, decoded, fine
    assert not _complete(trailer)
    assert read_image_size(str(padded)) == read_image_size(str(trailer)) == (128, 96)


def test_bulk_read_lists_every_bad_file_once(tmp_path):
    good = tmp_path / "good.png"
    data = _write(good)
    bad = []
    for i in range(7):
        path = tmp_path / f"bad{i}.png"
        path.write_bytes(data[: len(data) // 2])
        bad.append(str(path))
    with pytest.raises(UserError) as info:
        read_sizes([str(good)] + bad)
    message = str(info.value)
    assert message.startswith("7 unreadable images, first: ")
    assert message.count("(image file is truncated)") == 5 and message.endswith(" and 2 more")
    assert str(good) not in message


def test_decompression_bomb_is_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    _write(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 128x96 is then over twice the limit
    with pytest.raises(UserError, match=r"big\.png.*decompression bomb"):
        read_image_size(str(path))
