"""train_network.py: plug-in networks, masked loss, trackers (issue: training engine §1, §2, §4, §7)."""
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import train_network
from tests.training.train_helpers import base_args, make_shapes_folder


def test_lycoris_plugin_trains(tiny_sd, shapes_data, tmp_path):
    pytest.importorskip("lycoris")
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2, "--network_module",
                                 "lycoris.kohya", "--network_args", "algo=loha", "preset=attn-mlp"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(".hada_w1_a" in k for k in keys)  # LoHa tensors, not LoRA ones
    assert meta["ss_network_module"] == "lycoris.kohya"


def _controlnet_dataset(tmp_path, alpha: bool):
    data = make_shapes_folder(tmp_path / "img", repeats=1, n=2)
    img_dir = data / "1_sks shape"
    cond = tmp_path / "masks"
    cond.mkdir()
    for p in sorted(img_dir.glob("*.png")):
        m = np.zeros((64, 64, 3), np.uint8)
        m[:, :32] = 255  # left half counts
        Image.fromarray(m).save(cond / p.name)
        if alpha:
            rgba = np.concatenate([np.asarray(Image.open(p)), m[..., :1]], axis=-1)
            Image.fromarray(rgba, "RGBA").save(p)
    cfg = tmp_path / "ds.toml"
    if alpha:
        cfg.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{img_dir.as_posix()}"\n'
                       'alpha_mask = true\ncaption_extension = ".caption"\n', encoding="utf-8")
    else:
        cfg.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{img_dir.as_posix()}"\n'
                       f'conditioning_data_dir = "{cond.as_posix()}"\ncaption_extension = ".caption"\n',
                       encoding="utf-8")
    return cfg


@pytest.mark.parametrize("alpha", [False, True])
def test_masked_loss_trains(tiny_sd, tmp_path, alpha):
    cfg = _controlnet_dataset(tmp_path, alpha)
    out = tmp_path / "out"
    args = base_args(tiny_sd["sd1"]["safetensors"], tmp_path, out, 2, "--masked_loss", "--dataset_config", str(cfg))
    i = args.index("--train_data_dir")
    del args[i:i + 2]
    train_network.main(args)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert "ss_datasets" in meta


def test_masked_loss_without_masks_is_a_clear_error(tiny_sd, shapes_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1, "--masked_loss"))
    assert e.value.code == 2 and "mask" in capsys.readouterr().err


def test_wandb_missing_is_a_clear_error(tiny_sd, shapes_data, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb installed")
    with pytest.raises(SystemExit) as e:
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1,
                                     "--log_with", "wandb"))
    assert e.value.code == 2 and "pip install wandb" in capsys.readouterr().err


def test_sample_images_during_training(tiny_sd, shapes_data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks shape --w 64 --h 64 --d 5 --s 2 --n blurry\n# skipped\n"
                       "a red circle --w 75 --h 48 --s 2 --ss euler_a\n", encoding="utf-8")
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2, "--sample_prompts", str(prompts),
                                 "--sample_every_n_steps", "2", "--sample_at_first"))
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert len(names) == 4
    import re

    assert re.fullmatch(r"lora_e000000_00_\d{14}_5\.png", names[2]) or any(
        re.fullmatch(r"lora_e000000_00_\d{14}_5\.png", n) for n in names)
    assert any(re.fullmatch(r"lora_000002_01_\d{14}\.png", n) for n in names)
    sizes = {Image.open(out / "sample" / n).size for n in names}
    assert sizes == {(64, 64), (72, 64)}  # --w/--h per line: down to multiples of 8, at least 64


def test_sample_options_need_prompts(tiny_sd, shapes_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1,
                                     "--sample_every_n_steps", "1"))
    assert e.value.code == 2 and "--sample_prompts" in capsys.readouterr().err


def test_a_dataset_class_that_cannot_be_imported_is_one_line(tiny_sd, shapes_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1,
                                     "--dataset_class", "a.B"))
    assert e.value.code == 2 and "--dataset_class" in capsys.readouterr().err
