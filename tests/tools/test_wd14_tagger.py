"""WD14 tagger: preprocessing by hand, model files, and end-to-end runs on a tiny ONNX model (spec §2)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.tag_images_by_wd14_tagger import main
from library.errors import UserError
from library.tagging import wd14

REPO = "tiny/wd-tagger"
ROOT = Path(__file__).resolve().parents[2]
RED, GREEN = (255, 0, 0), (0, 255, 0)


def make_image(path: Path, colour, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def run(folder: Path, model_dir: Path, *extra: str) -> None:
    main([str(folder), "--model_dir", str(model_dir), "--repo_id", REPO, "--onnx", *extra])


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ---- preprocessing -------------------------------------------------------------------------------

def test_preprocess_pads_white_centred_and_flips_to_bgr():
    wide = Image.fromarray(np.array([[[10, 20, 30], [40, 50, 60]]], dtype=np.uint8))  # 2 wide, 1 tall
    out = wd14.preprocess_image(wide, 2)
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)
    # pad_top = 1 // 2 = 0: the white row goes below
    assert out.tolist() == [[[30, 20, 10], [60, 50, 40]], [[255, 255, 255], [255, 255, 255]]]
    tall = Image.fromarray(np.array([[[1, 2, 3]], [[4, 5, 6]], [[7, 8, 9]]], dtype=np.uint8))  # 1 wide, 3 tall
    out = wd14.preprocess_image(tall, 3)
    assert out[:, 0].tolist() == [[255] * 3] * 3 and out[:, 2].tolist() == [[255] * 3] * 3
    assert out[:, 1].tolist() == [[3, 2, 1], [6, 5, 4], [9, 8, 7]]


def test_preprocess_shrink_is_area_average_and_mode_converted():
    grey = np.array([[0, 0, 100, 100], [0, 0, 100, 100], [40, 40, 8, 8], [40, 40, 8, 8]], dtype=np.uint8)
    out = wd14.preprocess_image(Image.fromarray(grey, "L"), 2)
    assert out[..., 0].tolist() == [[0, 100], [40, 8]]
    assert wd14.preprocess_image(Image.fromarray(grey, "L"), 8).shape == (8, 8, 3)  # enlarged


# ---- model files -------------------------------------------------------------------------------

def test_missing_model_offline_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        wd14.ensure_model_files(str(tmp_path / "m"), "Some/repo")
    msg = str(e.value)
    assert "model.onnx" in msg and "selected_tags.csv" in msg and str(tmp_path / "m" / "Some_repo") in msg
    assert not (tmp_path / "m").exists()


def test_force_download_offline_is_an_error(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        wd14.ensure_model_files(str(tiny_model_dir), REPO, force_download=True)


def test_folder_without_onnx_file_is_reported(tiny_model_dir):
    (tiny_model_dir / "tiny_wd-tagger" / "model.onnx").unlink()
    with pytest.raises(UserError, match="model.onnx missing"):
        wd14.ensure_model_files(str(tiny_model_dir), REPO)


def test_bad_csv_header(tmp_path):
    (tmp_path / "selected_tags.csv").write_text("id,name,cat\n1,a,0\n", encoding="utf-8")
    with pytest.raises(UserError, match="unexpected csv format"):
        wd14.load_labels(tmp_path / "selected_tags.csv")


# ---- end to end ----------------------------------------------------------------------------------

def test_end_to_end_tags_follow_bgr_input(tmp_path, tiny_model_dir):
    red = make_image(tmp_path / "imgs" / "red.png", RED)
    make_image(tmp_path / "imgs" / "green.jpg", GREEN)
    run(red.parent, tiny_model_dir)
    # red in RGB is channel 2 in BGR: red_theme (not blue_theme), alice; o_o/^_^ kept (short)
    assert read(tmp_path / "imgs" / "red.txt") == "1girl, solo, red_theme, ^_^, o_o, alice_(wonderland)\n"
    assert read(tmp_path / "imgs" / "green.txt") == "1girl, solo, green_theme, ^_^, o_o, hatsune_miku_(vocaloid)\n"


def test_end_to_end_options_combined(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "imgs"
    make_image(folder / "a.png", RED)
    make_image(folder / "b.png", GREEN)
    run(folder, tiny_model_dir, "--remove_underscore", "--character_tag_expand", "--use_rating_tags",
        "--character_tags_first", "--undesired_tags", "solo;o_o", "--always_first_tags", "1girl",
        "--tag_replacement", "red theme,crimson", "--caption_separator", "; ", "--caption_extension", ".tags",
        "--frequency_tags", "--batch_size", "2")
    assert read(folder / "a.tags") == "1girl; sensitive; alice; wonderland; crimson; ^_^\n"
    out = capsys.readouterr().out
    assert "Tag frequencies:" in out and "1girl: 2" in out and "crimson: 1" in out


def test_append_tags_merges_existing_first(tmp_path, tiny_model_dir):
    img = make_image(tmp_path / "imgs" / "x.png", RED)
    (tmp_path / "imgs" / "x.txt").write_text("my tag, solo\n", encoding="utf-8")
    run(img.parent, tiny_model_dir, "--append_tags", "--thresh", "0.9")
    assert read(tmp_path / "imgs" / "x.txt") == "my tag, solo, 1girl, red_theme, ^_^, o_o, alice_(wonderland)\n"


def test_recursive_and_legacy_extension_alias(tmp_path, tiny_model_dir):
    make_image(tmp_path / "imgs" / "top.png", RED)
    make_image(tmp_path / "imgs" / "sub" / "deep.png", GREEN)
    run(tmp_path / "imgs", tiny_model_dir, "--caption_extention", ".cap")
    assert (tmp_path / "imgs" / "top.cap").exists() and not (tmp_path / "imgs" / "sub" / "deep.cap").exists()
    run(tmp_path / "imgs", tiny_model_dir, "--recursive")
    assert "green_theme" in read(tmp_path / "imgs" / "sub" / "deep.txt")


def test_unreadable_image_skipped_with_warning(tmp_path, tiny_model_dir, caplog):
    folder = tmp_path / "imgs"
    make_image(folder / "good.png", RED)
    (folder / "bad.png").write_bytes(b"not an image")
    run(folder, tiny_model_dir, "--max_data_loader_n_workers", "2", "--batch_size", "4")
    assert (folder / "good.txt").exists() and not (folder / "bad.txt").exists()
    assert "bad.png" in caplog.text and "1 of 2 images could not be read" in caplog.text


def test_all_images_unreadable_exit_2(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, tiny_model_dir)
    assert e.value.code == 2 and "none of the 1 images" in capsys.readouterr().err


def test_missing_folder_exit_2(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "nope", tiny_model_dir)
    assert e.value.code == 2 and "image folder not found" in capsys.readouterr().err


def test_fixed_batch_model_overrides_batch_size_and_pads_last_batch(tmp_path, make_tiny_tagger, caplog):
    make_tiny_tagger(tmp_path / "m" / "tiny_wd-tagger", size=16, batch=2)
    for i, colour in enumerate([RED, GREEN, RED]):
        make_image(tmp_path / "imgs" / f"{i}.png", colour, size=(20, 20))
    run(tmp_path / "imgs", tmp_path / "m", "--batch_size", "5")
    assert "use model batch size 2" in caplog.text
    assert [("red_theme" in read(tmp_path / "imgs" / f"{i}.txt")) for i in range(3)] == [True, False, True]


def test_model_and_csv_mismatch_exit_2(tmp_path, make_tiny_tagger, capsys):
    make_tiny_tagger(tmp_path / "m" / "tiny_wd-tagger", n_outputs=10)
    make_image(tmp_path / "imgs" / "a.png", RED)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "imgs", tmp_path / "m")
    assert e.value.code == 2 and "outputs 10 labels" in capsys.readouterr().err
    assert not (tmp_path / "imgs" / "a.txt").exists()


def test_runs_as_a_script(tmp_path, tiny_model_dir):
    make_image(tmp_path / "imgs" / "a.png", GREEN)
    proc = subprocess.run([sys.executable, str(ROOT / "finetune" / "tag_images_by_wd14_tagger.py"),
                           str(tmp_path / "imgs"), "--model_dir", str(tiny_model_dir), "--repo_id", REPO,
                           "--use_rating_tags_as_last_tag"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read(tmp_path / "imgs" / "a.txt").endswith(", general\n")
