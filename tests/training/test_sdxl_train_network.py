"""sdxl_train_network.py on a tiny SDXL model; diffusers' SDXL pipeline loads the result (issue: other trainers §1)."""

import pytest
import torch
from safetensors import safe_open

import sdxl_train_network
from tests.training.train_helpers import base_args
from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return write_tiny_model("sdxl", tmp_path_factory.mktemp("sdxl"))


def test_sdxl_lora_with_caches_loads_in_diffusers(tiny_sdxl, shapes_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from library.models.loading import load_models
    from networks import lora

    out = tmp_path / "out"
    sdxl_train_network.main(base_args(tiny_sdxl["safetensors"], shapes_data, out, 3, "--cache_text_encoder_outputs",
                                      "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only",
                                      "--cache_latents_to_disk", "--learning_rate", "1e-2"))
    images = sorted((shapes_data / "2_sks shape").glob("*.png"))
    for img in images:  # disk caches written next to the images
        assert img.with_suffix(".npz").exists() and (img.parent / (img.stem + "_te_outputs.npz")).exists()
    path = out / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert all(k.startswith("lora_unet_") for k in keys)  # --network_train_unet_only
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)

    # oracle: diffusers applies our file to its own SDXL U-Net; ours applies it to ours; outputs agree
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl["diffusers"]))
    pipe.load_lora_weights(str(path))
    ours = load_models(str(tiny_sdxl["diffusers"]))
    net, sd = lora.create_network_from_weights(1.0, str(path), ours.vae, ours.text_encoders, ours.unet,
                                                for_inference=True)
    net.apply_to(ours.text_encoders, ours.unet)
    net.load_state_dict(sd, strict=False)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 96, generator=g)
    add = {"text_embeds": torch.randn(1, 64, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        a = pipe.unet(x, torch.tensor([500]), ctx, added_cond_kwargs=add).sample
        b = ours.unet(x, torch.tensor([500]), ctx, added_cond_kwargs=add).sample
        base = load_models(str(tiny_sdxl["diffusers"])).unet(x, torch.tensor([500]), ctx, added_cond_kwargs=add).sample
    assert not torch.allclose(a, base, atol=1e-6)  # the LoRA does something
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sdxl_rejects_v2_and_cache_without_unet_only(tiny_sdxl, shapes_data, tmp_path, capsys):
    for extra, msg in ((["--v2"], "--v2"), (["--cache_text_encoder_outputs"], "--network_train_unet_only")):
        with pytest.raises(SystemExit) as e:
            sdxl_train_network.main(base_args(tiny_sdxl["safetensors"], shapes_data, tmp_path / "o", 1, *extra))
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_sd1_model_rejected_by_sdxl_script(tiny_sd, shapes_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sdxl_train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1))
    assert e.value.code == 2 and "SD1" in capsys.readouterr().err


def test_sdxl_sample_images_during_training(tiny_sdxl, shapes_data, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a sks shape --w 64 --h 64 --d 3 --s 2\n", encoding="utf-8")
    out = tmp_path / "out"
    sdxl_train_network.main(base_args(tiny_sdxl["safetensors"], shapes_data, out, 2, "--sample_prompts", str(prompts),
                                      "--sample_every_n_steps", "2"))
    assert [p.name.endswith("_3.png") for p in (out / "sample").iterdir()] == [True]
