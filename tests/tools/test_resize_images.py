"""tools/resize_images_to_resolution.py: sizes, names, successive resizing, copies (spec utilities §13)."""
from __future__ import annotations

import pytest
from PIL import Image

from tools.resize_images_to_resolution import fit_size, main, parse_resolutions


def test_fit_size_formula():
    # 1000x500 into 512x512: both sides × √(262144/500000), floored
    assert fit_size(1000, 500, 512 * 512) == (724, 362)
    assert fit_size(300, 200, 512 * 512) == (300, 200)  # fits: unchanged


def test_successive_resolutions_names_crop_and_copies(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    Image.new("RGB", (1000, 500), (200, 10, 10)).save(src / "pic.png")
    Image.new("L", (30, 20)).save(src / "small.jpg")
    (src / "pic.txt").write_text("a caption", encoding="utf-8")
    (src / "notes.md").write_text("x", encoding="utf-8")
    (src / "upper.PNG").write_bytes(b"copied as is: extension check is case-sensitive")
    main([str(src), str(dst), "--max_resolution", "512x512,100x100", "--divisible_by", "8",
          "--copy_associated_files", "--save_as_png"])
    # 512x512: 724x362 → cropped to 720x360; then 100x100 from 720x360: ×√(10000/259200) → 141x70 → 136x64
    assert Image.open(dst / "pic+512x512.png").size == (720, 360)
    assert Image.open(dst / "pic+100x100.png").size == (136, 64)
    assert Image.open(dst / "small+512x512.png").size == (24, 16)
    assert Image.open(dst / "small+512x512.png").mode == "RGB"
    assert (dst / "pic+512x512.txt").read_text(encoding="utf-8") == "a caption"
    assert (dst / "pic+100x100.txt").exists() and (dst / "pic.txt").exists() and (dst / "notes.md").exists()
    assert (dst / "upper.PNG").read_bytes().startswith(b"copied")


def test_jpeg_default_and_interpolation_choice(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64), (0, 128, 255)).save(src / "a.webp")
    main([str(src), str(tmp_path / "dst"), "--max_resolution", "32x32", "--interpolation", "lanczos4"])
    with Image.open(tmp_path / "dst" / "a+32x32.jpg") as im:
        assert im.format == "JPEG" and im.size == (32, 32)


@pytest.mark.parametrize("argv,message", [
    (["--max_resolution", "512"], "WxH"),
    (["--divisible_by", "0"], "--divisible_by"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "src"), str(tmp_path / "dst"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_parse_resolutions_strips_entries():
    assert parse_resolutions("512x512, 256x128") == [("512x512", 512, 512), ("256x128", 256, 128)]
