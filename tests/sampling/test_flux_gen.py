"""FLUX.1 generation in gen_img.py against diffusers' FluxPipeline (the oracle) on the tiny dev / schnell models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import gen_img
from library.models.flux_loading import load_flux_models
from library.sampling import gen_setup
from library.sampling.flux_pipeline import FluxGenerator
from library.sampling.flux_sampling import (FluxConditioning, euler_sample, flux_sigmas, image_ids, pack_latents,
                                            unpack_latents)
from library.sampling.pipeline import GenSettings, ImageSpec

PROMPTS = ["a red circle on a white background", "two blue squares"]
SIZE = 64  # pixels: 8x8 latents, 4x4 = 16 image tokens
T5_LENGTH = {"dev": 512, "schnell": 256}


@pytest.fixture(scope="module")
def pipes(tiny_flux):
    """Per model: diffusers' FluxPipeline and our generator on the same Diffusers folder (float32)."""
    out = {}
    for name in ("dev", "schnell"):
        folder = str(tiny_flux[name]["diffusers"])
        pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        ours = FluxGenerator(load_flux_models(folder), t5_max_length=T5_LENGTH[name], progress=False)
        out[name] = (pipe, ours)
    return out


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def test_schedule_formula():
    """Sigmas written out: linspace(1, 0), dev shifted by e^mu / (e^mu + 1/t - 1) with mu on the 256 -> 0.5,
    4096 -> 1.15 line."""
    assert torch.allclose(flux_sigmas(4, 1024, shift=False), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)
    expected = [1.0] + [math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in (0.75, 0.5, 0.25)] + [0.0]
    assert torch.allclose(flux_sigmas(4, 1024, shift=True), torch.tensor(expected), atol=1e-6)


def test_packing_matches_diffusers():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_latents_and_images_equal_flux_pipeline(pipes, name):
    """Same start noise, steps, guidance and size: our final latents and decoded images are FluxPipeline's."""
    pipe, ours = pipes[name]
    noise = _noise(7)
    settings = GenSettings(width=SIZE, height=SIZE, steps=4, guidance_scale=4.5)
    specs = [ImageSpec(prompt=p) for p in PROMPTS]
    kwargs = dict(prompt=PROMPTS, latents=pack_latents(noise), num_inference_steps=4, guidance_scale=4.5,
                  height=SIZE, width=SIZE, max_sequence_length=T5_LENGTH[name])
    expected = pipe(**kwargs, output_type="latent").images
    latents = ours.generate_latents(specs, settings, noise=noise)
    assert torch.allclose(pack_latents(latents), expected, atol=1e-5, rtol=1e-4)
    expected_images = pipe(**kwargs, output_type="pt").images
    images = (ours.decode_tensor(latents) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(images, expected_images, atol=1e-5)


def test_guidance_reaches_dev_only(pipes):
    """dev: another --guidance_scale changes the image (guidance embedding); schnell has none to change."""
    _, dev = pipes["dev"]
    specs = [ImageSpec(prompt=PROMPTS[0])]
    a = dev.generate_latents(specs, GenSettings(width=SIZE, height=SIZE, steps=2, guidance_scale=1.0))
    b = dev.generate_latents(specs, GenSettings(width=SIZE, height=SIZE, steps=2, guidance_scale=6.0))
    assert not torch.allclose(a, b)
    assert pipes["schnell"][1].guidance(GenSettings(width=SIZE, height=SIZE, guidance_scale=6.0)) is None


def test_t5_attention_mask_equals_dropping_the_padding(pipes):
    """--apply_t5_attn_mask: masking the padding keys gives what the real tokens alone give (attention over
    masked keys is attention without them; all text positions share id 0)."""
    _, ours = pipes["dev"]
    masked = FluxGenerator(ours.models, t5_max_length=32, apply_t5_attn_mask=True, progress=False)
    cond = masked.encode([PROMPTS[0]])
    n = int(cond.t5_mask.sum())
    assert 1 < n < 32
    short = FluxConditioning(cond.pooled, cond.t5[:, :n])
    noise = pack_latents(_noise(3)[:1])
    sigmas = flux_sigmas(2, 16, shift=True)
    with torch.no_grad():
        a = euler_sample(ours.models.transformer, noise, cond, sigmas, 3.5, 4, 4, progress=False)
        b = euler_sample(ours.models.transformer, noise, short, sigmas, 3.5, 4, 4, progress=False)
        unmasked = euler_sample(ours.models.transformer, noise, FluxConditioning(cond.pooled, cond.t5), sigmas, 3.5,
                                4, 4, progress=False)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, unmasked, atol=1e-4)


# ---------------------------------------------------------------- the gen_img.py command line

def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_cli_folder_and_bfl_files_write_the_flux_pipeline_image(tiny_flux, pipes, tmp_path):
    """Offline, from the Diffusers folder and from BFL files + --ae/--clip_l/--t5xxl/--tokenizer_cache_dir: the
    same seed gives the same PNG, equal to FluxPipeline's image from a CPU generator with that seed."""
    dev = tiny_flux["dev"]
    common = ["--prompt", f"{PROMPTS[0]} --g 3.0 --s 3", "--W", str(SIZE), "--H", str(SIZE), "--seed", "11"]
    folder_paths = gen_img.main(["--ckpt", str(dev["diffusers"]), "--outdir", str(tmp_path / "a"), *common])
    file_paths = gen_img.main(["--ckpt", str(dev["transformer"]), "--ae", str(dev["ae"]), "--clip_l",
                               str(dev["clip_l"]), "--t5xxl", str(dev["t5xxl"]), "--tokenizer_cache_dir",
                               str(dev["tokenizer_cache_dir"]), "--outdir", str(tmp_path / "b"), *common])
    assert len(folder_paths) == len(file_paths) == 1
    expected = pipes["dev"][0](prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=3.0, height=SIZE, width=SIZE,
                               generator=torch.Generator("cpu").manual_seed(11), output_type="np").images[0]
    expected = np.round(expected * 255).astype(int)
    for path in folder_paths + file_paths:
        assert np.abs(_png(path) - expected).max() <= 1
    with Image.open(folder_paths[0]) as im:
        assert im.text["guidance-scale"] == "3.0" and im.text["sampler"] == "euler" and im.text["steps"] == "3"
        assert "Distilled CFG Scale: 3.0" in im.text["parameters"]


def test_cli_schnell_files(tiny_flux, tmp_path):
    s = tiny_flux["schnell"]
    paths = gen_img.main(["--ckpt", str(s["transformer"]), "--ae", str(s["ae"]), "--clip_l", str(s["clip_l"]),
                          "--t5xxl", str(s["t5xxl"]), "--tokenizer_cache_dir", str(s["tokenizer_cache_dir"]),
                          "--prompt", "a cat --w 48 --h 32", "--steps", "2", "--images_per_prompt", "2",
                          "--batch_size", "2", "--apply_t5_attn_mask", "--outdir", str(tmp_path)])
    assert len(paths) == 2
    with Image.open(paths[0]) as im:
        assert im.size == (48, 32) and "guidance-scale" not in im.text


def _exit_message(capsys, argv):
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, needle", [
    (["--scale", "5"], "--scale cannot be used with a FLUX.1 model"),
    (["--network_module", "networks.lora", "--network_weights", "x.safetensors"],
     "--network_module networks.lora cannot be used with a FLUX.1 model"),
    (["--image_path", "x.png"], "--image_path cannot be used"),
    (["--highres_fix_scale", "0.5"], "--highres_fix_scale cannot be used"),
    (["--clip_skip", "2"], "--clip_skip cannot be used"),
    (["--sampler", "euler_a"], "--sampler euler_a: FLUX.1 samples with the flow-matching Euler sampler only"),
    (["--W", "72"], "--W 72: FLUX.1 image sizes are multiples of 16"),
    (["--prompt", "x --n ugly"], "prompt option --n cannot be used with a FLUX.1 model"),
])
def test_sd_only_options_rejected_before_loading(tiny_flux, capsys, monkeypatch, extra, needle):
    monkeypatch.setattr(gen_setup, "load_flux_models", lambda *a, **k: pytest.fail("a model was loaded"))
    msg = _exit_message(capsys, ["--ckpt", str(tiny_flux["dev"]["diffusers"]), "--prompt", "x", *extra])
    assert needle in msg


def test_flux_options_rejected_for_sd_and_schnell(tiny_flux, tmp_path, capsys):
    sd = tmp_path / "sd_model"
    sd.mkdir()
    msg = _exit_message(capsys, ["--ckpt", str(sd), "--prompt", "x", "--guidance_scale", "3"])
    assert "--guidance_scale is a FLUX.1 option" in msg
    msg = _exit_message(capsys, ["--ckpt", str(tiny_flux["schnell"]["diffusers"]), "--prompt", "x", "--guidance", "3"])
    assert "--guidance_scale: FLUX.1 schnell has no guidance input" in msg


def test_missing_tokenizer_offline(tiny_flux, capsys):
    """A BFL file without a T5 tokenizer source is refused before loading (the hub is not used offline)."""
    d = tiny_flux["dev"]
    msg = _exit_message(capsys, ["--ckpt", str(d["transformer"]), "--ae", str(d["ae"]), "--clip_l", str(d["clip_l"]),
                                 "--t5xxl", str(d["t5xxl"]), "--prompt", "x"])
    assert "no T5 tokenizer found" in msg
