"""gen_img sizes follow the VAE's own downsampling factor, 2 ** (levels - 1) as diffusers computes it.

A tiny VAE with two levels downsamples by 2, not 8: a --W 64 --H 48 request must still give a 64x48 image
(it used to give 16x12), for txt2img, inpainting and the latent-upscaling hires fix. Oracle: the requested
size, and the factor diffusers' own pipeline derives from the same VAE config.
"""
from __future__ import annotations

import pytest
from PIL import Image

import gen_img
from library.models.saving import save_diffusers
from library.models.tiny import build_tiny_models
from library.sampling.img2img import vae_scale_factor


@pytest.fixture(scope="module")
def two_level_model(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    models = build_tiny_models("sd1")
    models.vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                               norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64)
    folder = tmp_path_factory.mktemp("vae2") / "model"
    save_diffusers(models, str(folder))
    return str(folder)


def test_factor_matches_diffusers(two_level_model):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(two_level_model, subfolder="vae")
    pipe = StableDiffusionPipeline.from_pretrained(two_level_model)
    assert vae_scale_factor(vae) == pipe.vae_scale_factor == 2


@pytest.mark.parametrize("size, extra", [
    ((64, 48), []),
    ((128, 96), ["--highres_fix_scale", "0.5", "--highres_fix_latents_upscaling", "--highres_fix_steps", "1",
                 "--highres_fix_save_1st"]),
])
def test_requested_size_is_the_image_size(two_level_model, tmp_path, size, extra):
    paths = gen_img.main(["--ckpt", two_level_model, "--outdir", str(tmp_path), "--W", str(size[0]), "--H",
                          str(size[1]), "--steps", "2", "--prompt", "a cat", "--seed", "1", *extra])
    sizes = sorted(Image.open(p).size for p in paths)
    # hires fix: the 1st stage is half the size floored to multiples of 32 (spec generation §7)
    assert sizes == ([(64, 32), size] if extra else [size])


def test_inpaint_size(two_level_model, tmp_path):
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "init.png")  # img2img: the init image's size
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (16, 16, 48, 32))
    mask.save(tmp_path / "mask.png")
    paths = gen_img.main(["--ckpt", two_level_model, "--outdir", str(tmp_path / "out"), "--steps", "2",
                          "--prompt", "a cat", "--image_path", str(tmp_path / "init.png"), "--mask_path",
                          str(tmp_path / "mask.png"), "--strength", "1.0"])
    assert [Image.open(p).size for p in paths] == [(96, 64)]
