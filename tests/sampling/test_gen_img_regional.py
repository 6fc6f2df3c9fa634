"""gen_img.py regional LoRA end to end on a tiny SD1 model with two LoRAs and a colour-coded mask image: each
LoRA's effect stays in its region, colour codes and channels read the same regions, options are checked."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import gen_img
from library.models.loading import load_models
from library.sampling.regional import network_masks
from networks import lora_modules
from networks.lora_regional import module_role
from tools.make_tiny_model import write_tiny_model

from ..networks.helpers import write_lora

SIZE = 64
BASE = ["--W", str(SIZE), "--H", str(SIZE), "--steps", "3", "--seed", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("regional")
    ckpt = str(write_tiny_model("sd1", out, formats=("safetensors",))["safetensors"])
    models = load_models(ckpt)
    loras = [write_lora(models, out / f"lora{i}.safetensors", seed=i, conv_dim=None) for i in range(2)]
    # left half red = colour code 1 (network 0), right half green = colour code 2 (network 1)
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:, : SIZE // 2, 0] = 255
    pixels[:, SIZE // 2:, 1] = 255
    Image.fromarray(pixels).save(out / "mask.png")
    Image.fromarray(np.zeros_like(pixels)).save(out / "black.png")
    return {"ckpt": ckpt, "loras": loras, "mask": str(out / "mask.png"), "black": str(out / "black.png")}


def _image(setup, tmp_path, name, *extra, prompt="a cat AND a dog"):
    paths = gen_img.main(["--ckpt", setup["ckpt"], "--outdir", str(tmp_path / name), *BASE, "--prompt", prompt,
                          "--network_module", "networks.lora", "networks.lora",
                          "--network_weights", *setup["loras"], *extra])
    assert len(paths) == 1
    return np.asarray(Image.open(paths[0]), dtype=np.float64)


def test_mask_rules_written_out():
    """Colour code i+1 -> bits (R, G, B) x 255; channel i without codes; networks past the limit: whole image."""
    px = np.zeros((2, 4, 3), dtype=np.uint8)
    px[0, 0] = (255, 0, 0)      # code 1
    px[0, 1] = (0, 255, 0)      # code 2
    px[0, 2] = (255, 255, 0)    # code 3
    px[0, 3] = (0, 0, 255)      # code 4
    px[1, 0] = (128, 64, 32)    # no code; channels 0.5, 0.25, 0.125
    image = Image.fromarray(px)
    coded = network_masks(image, 4, max_color_codes=3)
    for i in range(3):
        expected = torch.zeros(2, 4)
        expected[0, i] = 1.0
        torch.testing.assert_close(coded[i], expected)
    torch.testing.assert_close(coded[3], torch.ones(2, 4))
    channels = network_masks(image, 4, max_color_codes=None)
    for i in range(3):
        torch.testing.assert_close(channels[i], torch.from_numpy(px[:, :, i].astype(np.float32) / 255.0))
    torch.testing.assert_close(channels[3], torch.ones(2, 4))


def _record_added(monkeypatch):
    """Wrap the regional forward of every LoRA module: (network index, role, input rows, what it added)."""
    records = []

    def recording(lora, x, output):
        result = real(lora, x, output)
        if result.shape == output.shape:
            records.append((lora.region.sub_prompt_index, module_role(lora.lora_name), lora.region,
                            (result - output).detach().float()))
        return result

    real = lora_modules.regional_output
    monkeypatch.setattr(lora_modules, "regional_output", recording)
    return records


def _spatial(added, state):
    """(B, C, h, w) of a U-Net activation whose area has a mask of width >= 2 (exact halves), else None."""
    area = added.shape[2] * added.shape[3] if added.ndim == 4 else added.shape[1]
    mask = state.mask_table.get(area)
    if mask is None or mask.shape[-1] < 2 or added.ndim not in (3, 4):
        return None
    h, w = mask.shape[-2:]
    return added if added.ndim == 4 else added.transpose(1, 2).reshape(added.shape[0], -1, h, w)


def test_each_lora_stays_in_its_region(setup, tmp_path, monkeypatch):
    """Through gen_img: every masked U-Net module of network 0 (red, left) adds nothing in the right half and
    network 1 (green, right) nothing in the left half; each text-encoder LoRA changes only its sub-prompt's row."""
    records = _record_added(monkeypatch)
    both = _image(setup, tmp_path, "both", "--mask_path", setup["mask"], "--network_regional_mask_max_color_codes",
                  "2")
    inside, outside, checked = [0.0, 0.0], [0.0, 0.0], 0
    for k, role, state, added in records:
        if role == "text":  # rows [negative, "a cat", "a dog"]: network k changes row 1 + k only
            changed = [r for r in range(added.shape[0]) if float(added[r].abs().max()) > 0]
            assert changed == [1 + k], (k, changed)
            continue
        if role != "regional":
            continue
        spatial = _spatial(added, state)
        if spatial is None:
            continue
        w = spatial.shape[-1]
        halves = (spatial[..., : w // 2].abs().sum(), spatial[..., w // 2:].abs().sum())
        inside[k] += float(halves[k])
        outside[k] += float(halves[1 - k])
        checked += 1
    assert checked > 20
    assert inside[0] > 0 and inside[1] > 0 and outside == [0.0, 0.0], (inside, outside)
    # channels R and G of the same picture are the same two regions: the same image
    channels = _image(setup, tmp_path, "channels", "--mask_path", setup["mask"])
    np.testing.assert_array_equal(channels, both)


def test_all_zero_regions_mean_whole_image(setup, tmp_path):
    """A black mask gives both networks the whole image: the same as a mask that is white in R and G."""
    white = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    white[..., :2] = 255
    Image.fromarray(white).save(tmp_path / "white.png")
    black = _image(setup, tmp_path, "black", "--mask_path", setup["black"])
    whole = _image(setup, tmp_path, "white", "--mask_path", str(tmp_path / "white.png"))
    np.testing.assert_array_equal(black, whole)


def test_and_is_plain_text_without_regions(setup, tmp_path):
    """Without --mask_path the prompt is not split: " AND " stays ordinary text (one image, no error even with
    fewer sub-prompts than networks)."""
    _image(setup, tmp_path, "plain", prompt="a cat")


def _error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_regional_option_errors(setup, tmp_path, capsys):
    common = ["--ckpt", setup["ckpt"], "--outdir", str(tmp_path), *BASE]
    nets = ["--network_module", "networks.lora", "networks.lora", "--network_weights", *setup["loras"]]
    msg = _error([*common, "--prompt", "a AND b", *nets, "--network_regional_mask_max_color_codes", "2"], capsys)
    assert "--network_regional_mask_max_color_codes needs --mask_path" in msg
    msg = _error([*common, "--prompt", "a AND b", *nets, "--mask_path", setup["mask"], "--network_pre_calc"], capsys)
    assert "--network_pre_calc" in msg and "regional" in msg
    msg = _error([*common, "--prompt", "just one", *nets, "--mask_path", setup["mask"]], capsys)
    assert "2 networks need at least 2 sub-prompts" in msg
    msg = _error([*common, "--prompt", "a AND b", *nets, "--mask_path", setup["mask"], "--negative_scale", "2"],
                 capsys)
    assert "--negative_scale" in msg
    msg = _error([*common, "--prompt", "a AND b", *nets, "--mask_path", setup["mask"],
                  "--network_regional_mask_max_color_codes", "0"], capsys)
    assert "--network_regional_mask_max_color_codes" in msg
    # the last network combines the sub-prompts in its cross-attention modules: a text-encoder-only LoRA cannot
    sd = load_file(setup["loras"][1])
    te_only = str(tmp_path / "te_only.safetensors")
    save_file({k: v for k, v in sd.items() if k.startswith("lora_te")}, te_only, {"ss_base_model_version": "sd_v1"})
    msg = _error([*common, "--prompt", "a AND b", "--network_module", "networks.lora", "networks.lora",
                  "--network_weights", setup["loras"][0], te_only, "--mask_path", setup["mask"]], capsys)
    assert "te_only.safetensors" in msg and "last network" in msg


def test_sdxl_batch_of_two_with_three_sub_prompts_and_hires_fix(tmp_path, monkeypatch):
    """SDXL: text-encoder rows [negative ×2, image 0 subs 0-2, image 1 subs 0-2]: network k changes rows 2+k and
    5+k in both encoders; the third sub-prompt has no network; hires fix prepares both stages."""
    ckpt = str(write_tiny_model("sdxl", tmp_path, formats=("diffusers",))["diffusers"])
    models = load_models(ckpt)
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    loras = [write_lora(models, tmp_path / f"x{i}.safetensors", seed=i, conv_dim=None, metadata=meta)
             for i in range(2)]
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:, : SIZE // 2, 0] = 255
    pixels[:, SIZE // 2:, 1] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    records = _record_added(monkeypatch)
    paths = gen_img.main(["--ckpt", ckpt, "--outdir", str(tmp_path / "out"), *BASE, "--batch_size", "2",
                          "--images_per_prompt", "2", "--prompt", "a cat AND a dog AND a bird --n bad",
                          "--network_module", "networks.lora", "networks.lora", "--network_weights", *loras,
                          "--mask_path", str(tmp_path / "mask.png"), "--highres_fix_scale", "0.5",
                          "--highres_fix_steps", "2"])
    assert len(paths) == 2 and Image.open(paths[0]).size == (SIZE, SIZE)
    text = [(k, added) for k, role, _, added in records if role == "text"]
    assert text
    for k, added in text:
        changed = [r for r in range(added.shape[0]) if float(added[r].abs().max()) > 0]
        assert changed == [2 + k, 5 + k], (k, changed)
