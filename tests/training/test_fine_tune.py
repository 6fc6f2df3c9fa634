"""fine_tune.py end to end on the tiny SD1 model (issue "other trainers" §3, §5; spec cli-options §12 F)."""
import json
import os

import pytest

import fine_tune
from tests.training.full_train_helpers import TE, UNET, assert_same, common_args, part, weights, write_config
from tests.training.train_helpers import make_shapes_folder


@pytest.fixture
def ft_data(tmp_path):
    """Images in one folder and a metadata JSON with captions (keys = file stems)."""
    root = make_shapes_folder(tmp_path / "data", repeats=1, n=3)
    images = root / "1_sks shape"
    meta = {p.stem: {"caption": f"a photo of a sks shape, number {p.stem}"} for p in sorted(images.glob("*.png"))}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return images, path


def ft_args(model, data, out, steps, *extra):
    images, meta = data
    return common_args(model, out, steps, "--train_data_dir", str(images), "--in_json", str(meta),
                       "--output_name", "ft", "--learning_rate", "1e-3", "--save_model_as", "safetensors", *extra)


def test_unet_only_by_default(tiny_sd, ft_data, tmp_path):
    out = tmp_path / "out"
    fine_tune.main(ft_args(tiny_sd["sd1"]["safetensors"], ft_data, out, 2))
    assert sorted(os.listdir(out)) == ["ft.run.json", "ft.safetensors"]  # beside each model: its run receipt (<name>.run.json, docs/beyond-sd-scripts.md)
    saved, base = weights(out / "ft.safetensors"), weights(tiny_sd["sd1"]["safetensors"])
    assert_same(part(saved, TE), part(base, TE))
    assert any(not v.equal(base[k]) for k, v in part(saved, UNET).items())


def test_train_text_encoder_and_resume_bit_identically(tiny_sd, ft_data, tmp_path):
    """--train_text_encoder changes the TE; 3 straight steps == 1 + resume + 2 (two LR groups)."""
    common = ["--train_text_encoder", "--learning_rate_te", "5e-4", "--save_every_n_steps", "1", "--save_state"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    fine_tune.main(ft_args(tiny_sd["sd1"]["safetensors"], ft_data, straight, 3, *common))
    saved, base = weights(straight / "ft.safetensors"), weights(tiny_sd["sd1"]["safetensors"])
    assert any(not v.equal(base[k]) for k, v in part(saved, TE).items())
    state = straight / "ft-step00000001-state"
    fine_tune.main(ft_args(tiny_sd["sd1"]["safetensors"], ft_data, resumed, 3, *common, "--resume", str(state)))
    assert_same(saved, weights(resumed / "ft.safetensors"))


def test_config_file(tiny_sd, ft_data, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(ft_args(tiny_sd["sd1"]["safetensors"], ft_data, out, 1), tmp_path / "ft.toml")
    fine_tune.main(["--config_file", str(cfg)])
    assert (out / "ft.safetensors").exists()


@pytest.mark.parametrize("bad,msg", [
    (["--diffusers_xformers"], "xformers"),
    (["--masked_loss"], "--masked_loss"),  # fine_tune.py has no masked-loss options (spec pitfall 5)
    (["--reg_data_dir", "x"], "--reg_data_dir"),
])
def test_bad_options_exit_2(tiny_sd, ft_data, tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit) as e:
        fine_tune.main(ft_args(tiny_sd["sd1"]["safetensors"], ft_data, tmp_path / "o", 1, *bad))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_without_in_json_exits_2(tiny_sd, ft_data, tmp_path, capsys):
    images, _ = ft_data
    with pytest.raises(SystemExit) as e:
        fine_tune.main(common_args(tiny_sd["sd1"]["safetensors"], tmp_path / "o", 1, "--train_data_dir", str(images)))
    assert e.value.code == 2 and "--in_json" in capsys.readouterr().err
