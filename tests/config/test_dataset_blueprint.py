"""Dataset definition from config file or command line, and the fallback chain (spec dataset-config §1-§4)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from library.config.dataset_blueprint import (
    DatasetParams,
    SubsetParams,
    dataset_params_from_args,
    parse_folder_name,
    subsets_from_folders,
)
from library.config.options import build_parser
from library.errors import UserError


def _args(argv: list[str], script: str = "train_network"):
    return build_parser(script).parse_args(argv)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    for name in ("10_sks dog", "3_sks_cat", "1", "abc", "0_zero", "-2_neg"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "stray.png").write_bytes(b"")  # files in the root are ignored
    (tmp_path / "reg" / "1_dog").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("name,expected", [
    ("10_sks dog", (10, "sks dog")), ("10_sks_dog", (10, "sks_dog")), ("10", (10, "")), ("abc", None),
    ("0_x", (0, "x")), ("x_10", None),
])
def test_parse_folder_name(name, expected):
    assert parse_folder_name(name) == expected


def test_folder_mode_sorted_skips_and_warns(folders, caplog):
    with caplog.at_level(logging.WARNING):
        subsets = subsets_from_folders(str(folders / "train"), is_reg=False, option="--train_data_dir")
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s["class_tokens"]) for s in subsets] == [
        ("1", 1, ""), ("10_sks dog", 10, "sks dog"), ("3_sks_cat", 3, "sks_cat")]  # sorted by name
    assert all(s["is_reg"] is False for s in subsets)
    assert "abc" in caplog.text and "0_zero" in caplog.text and "-2_neg" in caplog.text


def test_folder_mode_end_to_end_with_reg(folders):
    args = _args(["--train_data_dir", str(folders / "train"), "--reg_data_dir", str(folders / "reg"),
                  "--resolution", "512", "--shuffle_caption", "--train_batch_size", "4", "--prior_loss_weight", "0.7"])
    [dataset] = dataset_params_from_args(args, "train_network")
    assert dataset.style == "dreambooth" and dataset.batch_size == 4 and dataset.resolution == (512, 512)
    assert dataset.prior_loss_weight == 0.7
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets] == [
        (1, "", False), (10, "sks dog", False), (3, "sks_cat", False), (1, "dog", True)]
    assert all(s.shuffle_caption for s in dataset.subsets)  # CLI flag applies to every subset


def test_missing_train_data_dir_folder(tmp_path):
    with pytest.raises(UserError, match="--train_data_dir .*nope: not a folder"):
        dataset_params_from_args(_args(["--train_data_dir", str(tmp_path / "nope"), "--resolution", "512"]),
                                 "train_network")
    with pytest.raises(UserError, match="give --train_data_dir, --dataset_config or --in_json"):
        dataset_params_from_args(_args([]), "train_network")


def test_finetuning_mode_from_in_json(tmp_path):
    meta = _write(tmp_path / "meta.json", json.dumps({"a": {"caption": "x"}}))
    args = _args(["--in_json", str(meta), "--train_data_dir", str(tmp_path), "--dataset_repeats", "5"], "fine_tune")
    [dataset] = dataset_params_from_args(args, "fine_tune")
    [subset] = dataset.subsets
    assert dataset.style == "finetuning" and dataset.resolution is None
    assert subset.metadata_file == str(meta) and subset.image_dir == str(tmp_path) and subset.num_repeats == 5
    with pytest.raises(UserError, match="give --in_json"):
        dataset_params_from_args(_args([], "fine_tune"), "fine_tune")


def test_finetuning_mode_without_image_dir(tmp_path):
    meta = _write(tmp_path / "meta.json", "{}")
    [dataset] = dataset_params_from_args(_args(["--in_json", str(meta)]), "train_network")
    assert dataset.subsets[0].image_dir is None


def _config_args(tmp_path: Path, toml_text: str, argv: list[str] = (), script="train_network"):
    cfg = _write(tmp_path / "ds.toml", toml_text)
    return _args(["--dataset_config", str(cfg), *argv], script)


def test_fallback_chain(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    text = f"""
[general]
flip_aug = true
keep_tokens = 2
caption_extension = "txt"

[[datasets]]
resolution = [768, 512]
keep_tokens = 0
color_aug = false

  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  keep_tokens = 5
  num_repeats = 4

  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  flip_aug = false
  shuffle_caption = false

[[datasets]]
batch_size = 3
  [[datasets.subsets]]
  image_dir = '{tmp_path / "c"}'
"""
    args = _config_args(tmp_path, text, ["--resolution", "512", "--shuffle_caption", "--color_aug", "--keep_tokens", "9",
                                         "--train_batch_size", "2", "--dataset_repeats", "7", "--caption_separator", ";"])
    d0, d1 = dataset_params_from_args(args, "train_network")
    a, b = d0.subsets
    assert a.keep_tokens == 5 and b.keep_tokens == 0  # subset > dataset (0 is a real value)
    assert d1.subsets[0].keep_tokens == 2  # general > command line
    assert a.flip_aug is True and b.flip_aug is False  # general vs subset (False is a real value)
    assert a.color_aug is False and d1.subsets[0].color_aug is True  # dataset False beats --color_aug
    assert a.shuffle_caption is True and b.shuffle_caption is False  # CLI flag fills subsets that don't set it
    assert a.num_repeats == 4 and b.num_repeats == 7  # --dataset_repeats → num_repeats
    assert d0.batch_size == 2 and d1.batch_size == 3  # --train_batch_size → batch_size
    assert d0.resolution == (768, 512) and d1.resolution == (512, 512)
    assert a.caption_separator == ";"  # command line only
    assert a.caption_extension == ".txt"  # leading dot added
    assert d0.min_bucket_reso == 256 and d0.network_multiplier == 1.0  # argparse default / built-in default


def test_built_in_defaults_without_argparse():
    from library.config.dataset_blueprint import resolve_datasets
    import argparse

    config = {"datasets": [{"_style": "finetuning", "subsets": [{"metadata_file": __file__}]}]}
    [d] = resolve_datasets(config, argparse.Namespace())
    assert d.subsets[0] == SubsetParams(metadata_file=__file__)
    assert (d.batch_size, d.max_bucket_reso, d.bucket_reso_steps) == (1, 1024, 64)
    assert DatasetParams().subsets == []


def test_style_specific_fields_not_resolved_for_other_styles(tmp_path):
    meta = _write(tmp_path / "m.json", "{}")
    args = _config_args(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n",
                        ["--caption_extension", ".txt", "--conditioning_data_dir", "x"])
    [d] = dataset_params_from_args(args, "train_network")
    assert d.subsets[0].caption_extension == ".caption" and d.subsets[0].conditioning_data_dir is None


def test_duplicate_and_zero_repeat_subsets_ignored(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    sub = f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'a'}'\n"
    text = "[[datasets]]\nresolution = 512\n" + sub * 2 + sub + "  num_repeats = 0\n" + "[[datasets]]\nresolution = 256\n" + sub
    with caplog.at_level(logging.WARNING):
        d0, d1 = dataset_params_from_args(_config_args(tmp_path, text), "train_network")
    assert len(d0.subsets) == 1 and len(d1.subsets) == 1  # the same folder in two datasets is fine
    assert "datasets[0].subsets[1] ignored: the same subset" in caplog.text
    assert "datasets[0].subsets[2] ignored: num_repeats = 0 < 1" in caplog.text


def test_dreambooth_image_dir_must_exist(tmp_path):
    args = _config_args(tmp_path, f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'no'}'\n")
    with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[0\]: image_dir '.*no' is not a folder"):
        dataset_params_from_args(args, "train_network")


def test_missing_metadata_file_and_resolution(tmp_path):
    args = _config_args(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'nope.json'\n")
    with pytest.raises(UserError, match="metadata_file 'nope.json' not found"):
        dataset_params_from_args(args, "train_network")
    (tmp_path / "a").mkdir()
    args = _config_args(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\n")
    with pytest.raises(UserError, match=r"datasets\[0\]: resolution is required"):
        dataset_params_from_args(args, "train_network")


def test_dataset_config_warns_about_ignored_options(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    args = _config_args(tmp_path, f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\n",
                        ["--train_data_dir", "x", "--in_json", "y.json"])
    with caplog.at_level(logging.WARNING):
        [d] = dataset_params_from_args(args, "train_network")
    assert "--train_data_dir, --in_json ignored because --dataset_config is given" in caplog.text
    assert d.subsets[0].image_dir == str(tmp_path / "a")


def test_controlnet_dataset_with_masked_loss(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "m").mkdir()
    text = f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\n" \
           f"conditioning_data_dir = '{tmp_path / 'm'}'\n"
    [d] = dataset_params_from_args(_config_args(tmp_path, text, ["--masked_loss"]), "train_network")
    assert d.style == "controlnet" and d.subsets[0].conditioning_data_dir == str(tmp_path / "m")


def test_train_db_masked_loss_rejects_folder_mode(folders):
    args = _args(["--train_data_dir", str(folders / "train"), "--resolution", "512", "--masked_loss"], "train_db")
    with pytest.raises(UserError, match="dreambooth-style dataset"):
        dataset_params_from_args(args, "train_db")


@pytest.mark.parametrize("argv,expected", [
    (["--resolution", "512"], (512, 512)), (["--resolution", "768,512"], (768, 512)),
])
def test_command_line_resolution(folders, argv, expected):
    [d] = dataset_params_from_args(_args(["--train_data_dir", str(folders / "train"), *argv]), "train_network")
    assert d.resolution == expected


def test_bad_command_line_values(folders):
    base = ["--train_data_dir", str(folders / "train")]
    with pytest.raises(UserError, match="--resolution 'big'"):
        dataset_params_from_args(_args(base + ["--resolution", "big"]), "train_network")
    with pytest.raises(UserError, match="lo must not exceed hi"):
        dataset_params_from_args(_args(base + ["--resolution", "512", "--face_crop_aug_range", "4,2"]), "train_network")
    [d] = dataset_params_from_args(_args(base + ["--resolution", "512", "--face_crop_aug_range", "2,4",
                                                 "--caption_extention", "txt"]), "train_network")
    assert d.subsets[0].face_crop_aug_range == (2.0, 4.0)
    assert d.subsets[0].caption_extension == ".txt"  # legacy misspelling wins, dot added
