"""train_network.py with networks.oft and networks.lora_fa end to end on a tiny SD1, and gen_img with their files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import gen_img
import train_network
from tests.training.train_helpers import base_args


def _args(tiny_sd, data, out, steps, module, *extra):
    args = base_args(tiny_sd["sd1"]["safetensors"], data, out, steps, *extra)
    args[args.index("networks.lora")] = module
    return args


def _image(tiny_sd, out, *extra):
    paths = gen_img.main(["--ckpt", str(tiny_sd["sd1"]["safetensors"]), "--outdir", str(out), "--W", "64", "--H",
                          "64", "--steps", "2", "--prompt", "a sks shape --d 1", *extra])
    return np.asarray(Image.open(paths[0]), dtype=np.int16)


def test_oft_trains_the_unet_and_generates(tiny_sd, shapes_data, tmp_path, caplog):
    out = tmp_path / "oft"
    with caplog.at_level("INFO"):
        train_network.main(_args(tiny_sd, shapes_data, out, 3, "networks.oft", "--learning_rate", "1e-2"))
    assert "no text-encoder modules: the text encoder is not trained" in caplog.text
    path = out / "lora.safetensors"
    sd = load_file(str(path))
    assert sd and all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith(".oft_blocks"))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.oft"

    net = ["--network_module", "networks.oft", "--network_weights", str(path)]
    base = _image(tiny_sd, tmp_path / "g0")
    applied = _image(tiny_sd, tmp_path / "g1", *net)
    merged = _image(tiny_sd, tmp_path / "g2", *net, "--network_merge")
    precalc = _image(tiny_sd, tmp_path / "g3", *net, "--network_pre_calc")
    assert not np.array_equal(base, applied)
    assert np.abs(applied - merged).max() <= 1 and np.abs(applied - precalc).max() <= 1


def test_lora_fa_keeps_the_down_projection_of_its_seed(tiny_sd, shapes_data, tmp_path):
    short, long = tmp_path / "a", tmp_path / "b"
    train_network.main(_args(tiny_sd, shapes_data, short, 2, "networks.lora_fa"))
    train_network.main(_args(tiny_sd, shapes_data, long, 4, "networks.lora_fa"))
    a, b = load_file(str(short / "lora.safetensors")), load_file(str(long / "lora.safetensors"))
    assert a.keys() == b.keys()
    downs = [k for k in a if k.endswith("lora_down.weight")]
    ups = [k for k in a if k.endswith("lora_up.weight")]
    assert downs and all(torch.equal(a[k], b[k]) for k in downs)  # frozen: the same draw after 2 or 4 steps
    assert any(not torch.equal(a[k], b[k]) for k in ups)
    applied = _image(tiny_sd, tmp_path / "g", "--network_module", "networks.lora_fa", "--network_weights",
                     str(long / "lora.safetensors"))
    as_lora = _image(tiny_sd, tmp_path / "h", "--network_module", "networks.lora", "--network_weights",
                     str(long / "lora.safetensors"))
    assert np.array_equal(applied, as_lora)  # the same file layout: any LoRA loader reads it


@pytest.mark.parametrize("extra, message", [
    (["--network_args", "enable_conv=maybe"], "enable_conv='maybe'"),
    (["--network_dim", "7"], "--network_dim 7"),
    (["--network_train_text_encoder_only"], "adapts the U-Net only"),
])
def test_oft_option_errors_exit_2(tiny_sd, shapes_data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train_network.main(_args(tiny_sd, shapes_data, tmp_path / "o", 2, "networks.oft", *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_dylora_trains_resumes_exactly_and_generates(tiny_sd, shapes_data, tmp_path):
    """6 straight steps == 3 + save_state + resume + 3 (the drawn ranks come from the saved RNG state too)."""
    common = ["--network_args", "unit=2", "--network_dim", "4", "--save_every_n_steps", "3", "--save_state",
              "--learning_rate", "1e-2"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_network.main(_args(tiny_sd, shapes_data, straight, 6, "networks.dylora", *common))
    train_network.main(_args(tiny_sd, shapes_data, resumed, 6, "networks.dylora", *common, "--resume",
                             str(straight / "lora-step00000003-state")))
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith(("lora_te_", "lora_unet_")) for k in a)
    ups = [v for k, v in a.items() if k.endswith("lora_up.weight")]
    assert any(bool((u[:, 2:] != 0).any()) for u in ups) and any(bool((u[:, :2] != 0).any()) for u in ups)
    path = str(straight / "lora.safetensors")
    dy = _image(tiny_sd, tmp_path / "g", "--network_module", "networks.dylora", "--network_weights", path)
    as_lora = _image(tiny_sd, tmp_path / "h", "--network_module", "networks.lora", "--network_weights", path)
    assert np.array_equal(dy, as_lora)  # outside training a DyLoRA is its full-rank LoRA


@pytest.mark.parametrize("module, extra", [("networks.dylora", ["--network_args", "unit=2"]),
                                           ("networks.lora_fa", []), ("networks.oft", [])])
def test_variants_train_on_sdxl(tmp_path_factory, shapes_data, tmp_path, module, extra):
    import sdxl_train_network
    from tools.make_tiny_model import write_tiny_model

    model = write_tiny_model("sdxl", tmp_path_factory.mktemp("sdxl"), formats=("safetensors",))["safetensors"]
    args = base_args(model, shapes_data, tmp_path / "o", 2, *extra)
    args[args.index("networks.lora")] = module
    sdxl_train_network.main(args)
    keys = load_file(str(tmp_path / "o" / "lora.safetensors")).keys()
    prefixes = ("oft_unet_",) if module == "networks.oft" else ("lora_te1_", "lora_te2_", "lora_unet_")
    assert keys and all(k.startswith(prefixes) for k in keys)
    assert any(k.startswith(("lora_unet_input_blocks_", "oft_unet_input_blocks_")) for k in keys)  # LDM paths
