"""Dataset config schema: placement, styles, trainer flags, messages (spec dataset-config §2)."""
from __future__ import annotations

import json

import pytest

from library.config.dataset_schema import ConfigSanitizer, load_dataset_config, sanitizer_for
from library.errors import UserError

DB = {"image_dir": "imgs"}
FT = {"metadata_file": "meta.json"}
CN = {"image_dir": "imgs", "conditioning_data_dir": "masks"}


def _sanitize(config: dict, script: str = "train_network", masked_loss: bool = False) -> dict:
    return sanitizer_for(script, masked_loss).sanitize(config, "x.toml")


def _error(config: dict, script: str = "train_network", masked_loss: bool = False) -> str:
    with pytest.raises(UserError) as e:
        _sanitize(config, script, masked_loss)
    return str(e.value)


def test_valid_config_converted():
    out = _sanitize({
        "general": {"resolution": 512, "shuffle_caption": True, "class_tokens": "sks", "caption_dropout_rate": 0},
        "datasets": [
            {"resolution": [768, 512], "batch_size": 2, "network_multiplier": 1,
             "subsets": [{**DB, "num_repeats": 3, "face_crop_aug_range": [2, 4], "alpha_mask": True}]},
            {"subsets": [{**FT, "image_dir": "imgs", "alpha_mask": False}]},
        ],
    })
    assert out["general"]["resolution"] == (512, 512)
    d0, d1 = out["datasets"]
    assert d0["resolution"] == (768, 512) and d0["_style"] == "dreambooth"
    assert d0["network_multiplier"] == 1.0 and isinstance(d0["network_multiplier"], float)
    assert d0["subsets"][0]["face_crop_aug_range"] == (2.0, 4.0)
    assert d1["_style"] == "finetuning"


def test_dataset_key_inside_subset_rejected():
    msg = _error({"datasets": [{"subsets": [DB, {**DB, "batch_size": 2}]}]})
    assert msg.startswith("x.toml: datasets[0].subsets[1]: key 'batch_size' not allowed in a subset")
    assert "[[datasets]] or [general]" in msg


def test_subset_only_key_at_dataset_level_rejected():
    assert "belongs in a subset" in _error({"datasets": [{"is_reg": True, "subsets": [DB]}]})
    assert "belongs in a subset" in _error({"general": {"image_dir": "x"}})


def test_unknown_key_gets_closest_name():
    msg = _error({"datasets": [{"subsets": [{**DB, "num_repets": 2}]}]})
    assert "datasets[0].subsets[0]: unknown key 'num_repets'; did you mean 'num_repeats'?" in msg
    assert "unknown key 'dataset'; did you mean 'datasets'?" in _error({"dataset": []})
    assert "did you mean 'enable_bucket'?" in _error({"general": {"enable_buckets": True}})


def test_dropout_keys_rejected_for_textual_inversion():
    config = {"datasets": [{"subsets": [{**DB, "caption_dropout_rate": 0.1}]}]}
    assert "does not support caption dropout" in _error(config, "train_textual_inversion")
    assert "does not support caption dropout" in _error({"general": {"caption_tag_dropout_rate": 0.1}},
                                                       "train_textual_inversion")
    _sanitize(config, "train_network")  # fine where dropout is supported


def test_finetuning_subset_needs_metadata_file():
    msg = _error({"datasets": [{"subsets": [{"image_dir": "x", "metadata_file": "m.json"}, {"image_dir": "y"}]}]})
    assert "cannot be mixed" in msg and "datasets[0]" in msg
    msg = _error({"datasets": [{"subsets": [{"image_dir": "y"}]}]}, "fine_tune")
    assert "datasets[0] is a dreambooth-style dataset" in msg and "metadata_file" in msg


def test_required_image_dir():
    assert "datasets[0].subsets[0]: required key 'image_dir' is missing" in _error(
        {"datasets": [{"subsets": [{"num_repeats": 2}]}]})


def test_mixed_styles_error():
    msg = _error({"datasets": [{"subsets": [DB, FT]}]})
    assert "DreamBooth subset and fine tuning subset cannot be mixed" in msg


def test_different_styles_in_different_datasets_allowed():
    out = _sanitize({"datasets": [{"subsets": [DB]}, {"subsets": [FT]}]})
    assert [d["_style"] for d in out["datasets"]] == ["dreambooth", "finetuning"]


def test_controlnet_only_with_masked_loss():
    config = {"datasets": [{"subsets": [CN]}]}
    assert _sanitize(config, masked_loss=True)["datasets"][0]["_style"] == "controlnet"
    msg = _error(config)
    assert "key 'conditioning_data_dir' not allowed" in msg and "--masked_loss" in msg
    # some subsets with conditioning_data_dir: a DreamBooth dataset, where the key is not allowed
    assert "needs it in every subset" in _error({"datasets": [{"subsets": [DB, {**CN, "image_dir": "b"}]}]},
                                                masked_loss=True)


def test_train_db_styles():
    _sanitize({"datasets": [{"subsets": [DB]}]}, "train_db")
    assert "finetuning-style dataset" in _error({"datasets": [{"subsets": [FT]}]}, "train_db")
    # spec §2.3: with --masked_loss train_db accepts only ControlNet-style datasets
    _sanitize({"datasets": [{"subsets": [CN]}]}, "train_db", masked_loss=True)
    msg = _error({"datasets": [{"subsets": [DB]}]}, "train_db", masked_loss=True)
    assert "dreambooth-style dataset" in msg and "conditioning_data_dir" in msg


def test_general_keys_depend_on_trainer():
    assert "not allowed" in _error({"general": {"class_tokens": "sks"}}, "fine_tune")
    _sanitize({"general": {"class_tokens": "sks"}}, "train_network")


def test_style_specific_dataset_keys():
    assert "not allowed here for this dataset style" in _error({"datasets": [{"class_tokens": "x", "subsets": [FT]}]})


def test_caption_separator_explained():
    msg = _error({"datasets": [{"subsets": [{**DB, "caption_separator": ";"}]}]})
    assert "caption_separator is a command-line option in v0.8.x (--caption_separator)" in msg


@pytest.mark.parametrize("where,key,value,expected", [
    ("subset", "num_repeats", "3", "expected an integer"),
    ("subset", "num_repeats", True, "expected an integer"),
    ("subset", "shuffle_caption", 1, "expected true or false"),
    ("subset", "face_crop_aug_range", [1.0], "expected an array of two numbers"),
    ("dataset", "resolution", [512], 'expected an integer, "W,H" or [W, H]'),
    ("dataset", "network_multiplier", "1", "expected a number"),
])
def test_type_errors_name_place_key_and_expectation(where, key, value, expected):
    subset = dict(DB)
    dataset = {"subsets": [subset]}
    (subset if where == "subset" else dataset)[key] = value
    msg = _error({"datasets": [dataset]})
    place = "datasets[0].subsets[0]" if where == "subset" else "datasets[0]"
    assert f"x.toml: {place}.{key} = {value!r}: {expected}" in msg


def test_resolution_forms():
    for value, expected in [(512, (512, 512)), ([768, 512], (768, 512)), ("768,512", (768, 512)), ("640", (640, 640))]:
        assert _sanitize({"general": {"resolution": value}})["general"]["resolution"] == expected


def test_structure_errors():
    assert "'datasets' must be an array" in _error({"datasets": {"a": 1}})
    assert "general must be a table" in _error({"general": 3})
    assert "datasets[0].subsets must be an array" in _error({"datasets": [{"subsets": {}}]})


def test_empty_subsets_list_allowed():
    assert _sanitize({"datasets": [{"subsets": []}]}, masked_loss=True)["datasets"][0]["_style"] == "controlnet"
    assert _sanitize({"datasets": [{}]}, "train_db")["datasets"][0]["_style"] == "dreambooth"


def test_sanitizer_needs_a_style():
    with pytest.raises(ValueError):
        ConfigSanitizer(False, False, False, True)


def test_load_toml_json_and_bad_extension(tmp_path):
    (tmp_path / "d.TOML").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "é"\n', encoding="utf-8")
    assert load_dataset_config(tmp_path / "d.TOML")["datasets"][0]["subsets"][0]["image_dir"] == "é"
    (tmp_path / "d.json").write_text(json.dumps({"general": {"flip_aug": True}}), encoding="utf-8")
    assert load_dataset_config(tmp_path / "d.json") == {"general": {"flip_aug": True}}
    (tmp_path / "d.yaml").write_text("a: 1", encoding="utf-8")
    with pytest.raises(UserError, match="expected a .toml or .json file"):
        load_dataset_config(tmp_path / "d.yaml")
    with pytest.raises(UserError, match="file not found"):
        load_dataset_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[[datasets]\n", encoding="utf-8")
    with pytest.raises(UserError, match="not a valid UTF-8 TOML file"):
        load_dataset_config(tmp_path / "bad.toml")
