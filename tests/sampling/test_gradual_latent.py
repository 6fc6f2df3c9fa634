"""Gradual Latent (`--gradual_latent_*`, prompt options `--glt/--glr/--gle/--gls/--glsn/--glus`), spec §1.5, §3.

Oracles: a Gaussian blur written out with loops (reflect padding, normalised exp(-x²/2σ²) kernel); the latent size
schedule written out by hand for given timesteps; plain Diffusers Euler-a for ratio 1; the enlarging Euler-a step
written out from the k-diffusion formulas.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gen_img
import library.sampling.pipeline as pipeline_module
from library.errors import UserError
from library.sampling.gradual_latent import (GradualLatent, UnsharpMask, gaussian_blur, gradual_latent_scheduler,
                                             grown_size, parse_unsharp, resolve_gradual_latent)
from library.sampling.pipeline import GenSettings, HiresSettings, ImageSpec, Pipeline
from library.sampling.samplers import make_scheduler

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny(tiny_diffusers):
    return tiny_diffusers


# ---------------------------------------------------------------- unsharp mask

def _blur_by_hand(x: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """2-D Gaussian blur of an (H, W) array, reflect padding (…c b | a b c d | c b…), loops only."""
    half = ksize // 2
    weights = [math.exp(-((i - half) ** 2) / (2 * sigma**2)) for i in range(ksize)]
    total = sum(weights)
    weights = [w / total for w in weights]
    h, w = x.shape

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
    out = np.zeros_like(x, dtype=np.float64)
    for r in range(h):
        for c in range(w):
            out[r, c] = sum(weights[a] * weights[b] * x[reflect(r + a - half, h), reflect(c + b - half, w)]
                            for a in range(ksize) for b in range(ksize))
    return out


@pytest.mark.parametrize("ksize, sigma", [(3, 0.5), (5, 1.3), (1, 2.0)])
def test_gaussian_blur_and_unsharp_match_the_formula(ksize, sigma):
    x = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(ksize))
    blurred = gaussian_blur(x, ksize, sigma)
    expected = np.stack([[_blur_by_hand(x[b, ch].double().numpy(), ksize, sigma) for ch in range(3)]
                         for b in range(2)])
    np.testing.assert_allclose(blurred.numpy(), expected, rtol=1e-5, atol=1e-6)
    sharpened = UnsharpMask(ksize, sigma, 0.7)(x)
    np.testing.assert_allclose(sharpened.numpy(), x.numpy() + 0.7 * (x.numpy() - expected), rtol=1e-5, atol=1e-5)


def test_parse_unsharp():
    assert parse_unsharp(None) is None
    assert parse_unsharp("3,0.5,0.2") == UnsharpMask(3, 0.5, 0.2, True)
    assert parse_unsharp("5.0,1,0.5,0") == UnsharpMask(5, 1.0, 0.5, False)
    assert parse_unsharp([3.0, 0.5, 0.2, 1.0]) == UnsharpMask(3, 0.5, 0.2, True)
    for bad in ("3,0.5", "3,0.5,0.2,1,9", "a,b,c", "3.5,1,1", "3,1,1,2", [3.0, 1.0]):
        with pytest.raises(UserError, match="ksize,sigma,strength"):
            parse_unsharp(bad)
    with pytest.raises(UserError, match="odd"):
        parse_unsharp("4,1,1")
    with pytest.raises(UserError, match="sigma must be > 0"):
        parse_unsharp("3,0,1")


# ---------------------------------------------------------------- settings and size schedule

def test_resolve_line_overrides_and_defaults():
    cli = (None, 0.5, 0.125, 3, 1.0, None)
    assert resolve_gradual_latent(*cli) is None
    assert resolve_gradual_latent(*cli, line={"width": 64}) is None
    assert resolve_gradual_latent(*cli, line={"gradual_latent_ratio": 0.25}) == GradualLatent(650, 0.25)
    assert resolve_gradual_latent(700, 0.5, 0.125, 3, 1.0, "3,1,0.5", line={"gradual_latent_s_noise": 0.9}) == \
        GradualLatent(700, 0.5, 0.125, 3, 0.9, UnsharpMask(3, 1.0, 0.5))
    assert resolve_gradual_latent(*cli, line={"gradual_latent_unsharp_params": [3.0, 1.0, 0.5, 0.0]}).unsharp == \
        UnsharpMask(3, 1.0, 0.5, False)


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"), ({"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
    ({"ratio_step": 0.0}, "ratio step must be > 0"), ({"every_n_steps": -1}, "every_n_steps must be >= 0"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(UserError, match=message):
        GradualLatent(**kwargs)


TIMESTEPS_20 = [951 - 50 * i for i in range(20)]  # 951, 901, ..., 1


def test_size_schedule_by_hand():
    """512x768 px (latent 64x96), defaults: grows at t=601 (i=7) and every 3 steps after, to 1.0 at i=16."""
    targets = GradualLatent(650).schedule(TIMESTEPS_20, (64, 96))
    expected = [None] * 20
    expected[7] = (40, 56)    # 0.625: 40, int(60) // 8 * 8 = 56
    expected[10] = (48, 72)   # 0.75
    expected[13] = (56, 80)   # 0.875: 56, int(84) // 8 * 8 = 80
    expected[16] = (64, 96)   # 1.0
    assert targets == expected


def test_size_schedule_every_step_ratio_step_and_final_resize(caplog):
    # every_n_steps 1, ratio 0.25 step 0.25, timesteps 1000 (from the first step)
    assert GradualLatent(1000, 0.25, 0.25, 1).schedule([900, 800, 700, 600, 500], (64, 64)) == \
        [(32, 32), (48, 48), (64, 64), None, None]
    # every 2 steps; not full by the end: the last step goes to the full size (with a warning)
    with caplog.at_level(logging.WARNING):
        targets = GradualLatent(650, 0.5, 0.125, 2).schedule([876, 751, 626, 501, 376, 251, 126, 1], (64, 64))
    assert targets == [None, None, (40, 40), None, (48, 48), None, (56, 56), (64, 64)]
    assert "last step enlarges" in caplog.text
    # ratio 1: never resized; tiny latents never round to 0
    assert GradualLatent(650, 1.0).schedule(TIMESTEPS_20, (64, 64)) == [None] * 20
    assert grown_size(8, 0.625) == 8 and grown_size(65, 1.0) == 65 and grown_size(65, 0.9) == 56


def test_start_shrinks_bicubic_then_sharpens():
    x = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    assert GradualLatent(ratio=1.0).start(x) is x
    small = GradualLatent(ratio=0.5).start(x)
    torch.testing.assert_close(small, F.interpolate(x, scale_factor=0.5, mode="bicubic", align_corners=False))
    sharp = GradualLatent(ratio=0.5, unsharp=UnsharpMask(3, 1.0, 0.5)).start(x)
    torch.testing.assert_close(sharp, small + 0.5 * (small - gaussian_blur(small, 3, 1.0)))
    with pytest.raises(UserError, match="too large"):
        GradualLatent(ratio=0.25, unsharp=UnsharpMask(9, 1.0, 0.5)).start(x)


# ---------------------------------------------------------------- the enlarging Euler-a step

@pytest.mark.parametrize("unsharp", [None, UnsharpMask(3, 0.8, 0.5, True), UnsharpMask(3, 0.8, 0.5, False)])
@pytest.mark.parametrize("v_pred", [False, True])
def test_resizing_step_matches_formula(unsharp, v_pred):
    setting = GradualLatent(650, s_noise=0.8, unsharp=unsharp)
    s = gradual_latent_scheduler(make_scheduler("euler_a", v_pred, False), setting)
    s.resize_target = (8, 12)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 4, 6, generator=g), torch.randn(2, 4, 4, 6, generator=g)
    t = s.timesteps[3]
    s.scale_model_input(x, t)
    prev = s.step(out, t, x, generator=[torch.Generator().manual_seed(i) for i in (5, 6)]).prev_sample
    sigma, sigma_to = s.sigmas[3].item(), s.sigmas[4].item()
    x0 = x * (1 / (sigma**2 + 1)) - out * sigma / (sigma**2 + 1) ** 0.5 if v_pred else x - sigma * out
    up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
    down = math.sqrt(sigma_to**2 - up**2)
    d = (x - x0) / sigma

    def big(y):
        return F.interpolate(y, size=(8, 12), mode="bicubic", align_corners=False)
    if unsharp is None or unsharp.target_x:
        expected = big(x + d * (down - sigma))
        if unsharp is not None:
            expected = expected + 0.5 * (expected - gaussian_blur(expected, 3, 0.8))
    else:
        bx = big(x)
        expected = bx + 0.5 * (bx - gaussian_blur(bx, 3, 0.8)) + big(d) * (down - sigma)
    noise = torch.cat([torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(i)) for i in (5, 6)])
    torch.testing.assert_close(prev, expected + noise * up * 0.8, rtol=1e-5, atol=1e-5)
    assert s.step_index == 4


# ---------------------------------------------------------------- the pipeline

def _euler_a(models, gradual: GradualLatent | None, size: int = 64, steps: int = 4, sampler: str = "euler_a"):
    """Final latents of one image (seed 3) with `gradual` (None: plain Euler-a)."""
    settings = GenSettings(size, size, steps=steps, sampler=sampler, gradual_latent=gradual)
    return Pipeline(models, progress=False).generate_latents([ImageSpec(PROMPT, seed=3)], settings)


def test_ratio_one_is_plain_euler_a_bit_for_bit(sd1):
    assert torch.equal(_euler_a(sd1, None), _euler_a(sd1, GradualLatent(1000, 1.0)))


def test_pipeline_runs_the_schedule(sd1):
    sizes = []
    handle = sd1.unet.register_forward_pre_hook(lambda _m, args, kwargs: sizes.append(
        tuple((args[0] if args else kwargs["sample"]).shape[-2:])), with_kwargs=True)
    try:
        grown = _euler_a(sd1, GradualLatent(1000, 0.5, 0.25, 2), size=128, steps=5, sampler="k_euler_a")
    finally:
        handle.remove()
    # latent 16: start 8; grow at step 0 (0.75 -> 12 // 8 * 8 = 8) and step 2 (1.0 -> 16)
    assert sizes == [(8, 8), (8, 8), (8, 8), (16, 16), (16, 16)]
    plain = _euler_a(sd1, None, size=128, steps=5, sampler="k_euler_a")
    assert grown.shape == plain.shape == (1, 4, 16, 16)
    assert torch.isfinite(grown).all() and not torch.allclose(grown, plain)


def test_hires_fix_and_img2img_end_full_size(sd1):
    settings = GenSettings(128, 128, steps=4, sampler="euler_a", gradual_latent=GradualLatent(1000, 0.5, 0.5, 1))
    first, final = Pipeline(sd1, progress=False).generate_hires([ImageSpec(PROMPT, seed=1)], settings,
                                                                 HiresSettings(0.5, steps=3))
    assert first[0].size == (64, 64) and final[0].size == (128, 128)


def test_pipeline_refuses_other_samplers_and_inpaint(sd1):
    with pytest.raises(UserError, match="euler_a / k_euler_a only, not 'euler'"):
        _euler_a(sd1, GradualLatent(), sampler="euler")
    spec = ImageSpec(PROMPT, init_image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 64)))
    with pytest.raises(UserError, match="inpainting"):
        Pipeline(sd1, progress=False).generate_latents(
            [spec], GenSettings(64, 64, steps=2, sampler="euler_a", gradual_latent=GradualLatent()))


# ---------------------------------------------------------------- gen_img

def _gen(tiny, tmp_path, *extra, family="sd1", outdir="out", size="128"):
    out = tmp_path / outdir
    paths = gen_img.main(["--ckpt", tiny[family], "--outdir", str(out), "--W", size, "--H", size, "--steps", "4",
                          "--sampler", "euler_a", "--sequential_file_name", *extra])
    return [np.asarray(Image.open(p)) for p in paths]


def test_command_line_gradual_latent_full_size_and_different(tiny, tmp_path):
    (grown,) = _gen(tiny, tmp_path, "--prompt", f"{PROMPT} --d 4", "--gradual_latent_timesteps", "1000",
                    "--gradual_latent_every_n_steps", "1", "--gradual_latent_unsharp_params", "3,0.5,0.3")
    (plain,) = _gen(tiny, tmp_path, "--prompt", f"{PROMPT} --d 4", outdir="plain")
    assert grown.shape == plain.shape == (128, 128, 3) and not np.array_equal(grown, plain)


def test_prompt_options_enable_it_for_their_line_only(tiny, tmp_path, monkeypatch):
    used = []
    real = pipeline_module.Pipeline.generate_latents

    def recording(self, specs, settings, init_latents=None):
        used.append(settings.gradual_latent)
        return real(self, specs, settings, init_latents)
    monkeypatch.setattr(pipeline_module.Pipeline, "generate_latents", recording)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT} --d 5 --glt 1000 --gle 1 --glus 3,0.5,0.3,0\n{PROMPT} --d 5\n", encoding="utf-8")
    grown, plain = _gen(tiny, tmp_path, "--from_file", str(prompts), "--batch_size", "2")
    assert used == [GradualLatent(1000, 0.5, 0.125, 1, 1.0, UnsharpMask(3, 0.5, 0.3, False)), None]
    assert grown.shape == plain.shape and not np.array_equal(grown, plain)
    (alone,) = _gen(tiny, tmp_path, "--prompt", f"{PROMPT} --d 5", outdir="alone")
    assert np.array_equal(plain, alone)


def test_sdxl_runs(tiny, tmp_path):
    (grown,) = _gen(tiny, tmp_path, "--prompt", f"{PROMPT} --d 2 --glr 0.5 --glt 1000 --gle 1", family="sdxl")
    (plain,) = _gen(tiny, tmp_path, "--prompt", f"{PROMPT} --d 2", family="sdxl", outdir="plain")
    assert grown.shape == plain.shape == (128, 128, 3) and not np.array_equal(grown, plain)


@pytest.mark.parametrize("extra, message", [
    (["--gradual_latent_timesteps", "650", "--gradual_latent_ratio", "0"],
     "--gradual_latent_ratio 0.0 is out of range: it must be from 0 to 1 (excluding 0)"),
    (["--gradual_latent_timesteps", "650", "--gradual_latent_ratio", "1.5"], "--gradual_latent_ratio 1.5 is out of range"),
    (["--gradual_latent_timesteps", "650", "--gradual_latent_unsharp_params", "3,0.5"], "ksize,sigma,strength"),
    (["--gradual_latent_timesteps", "650", "--sampler", "ddim"], "euler_a / k_euler_a only, not 'ddim'"),
    (["--prompt", "a cat --glr 0", "--sampler", "euler_a"],
     "prompt option --glr 0.0 is out of range: it must be from 0 to 1 (excluding 0) (as --gradual_latent_ratio)"),
    (["--prompt", "a cat --glus 3,0.5", "--sampler", "euler_a"], "ksize,sigma,strength"),
    (["--prompt", "a cat --glt 650", "--sampler", "dpmsolver++"], "not 'dpmsolver++': a cat --glt 650"),
])
def test_bad_values_exit_2_with_one_line(tiny, tmp_path, capsys, extra, message):
    argv = ["--ckpt", tiny["sd1"], "--outdir", str(tmp_path / "o"), *extra]
    if "--prompt" not in extra:
        argv += ["--prompt", "a cat", "--sampler", "euler_a"] if "--sampler" not in extra else ["--prompt", "a cat"]
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error:")
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")


def test_tuning_options_without_enabler_warn_once(caplog):
    """`--gradual_latent_*` / `--ds_*` without `--gradual_latent_timesteps` / `--ds_depth_1` only serve prompt lines'
    own --gl* / --ds* options: one warning line per feature, none when enabled or left at the defaults."""
    from library.sampling.gen_options import build_gen_parser, reject_unsupported

    def warnings(argv):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="library.sampling.gen_options"):
            reject_unsupported(build_gen_parser().parse_args(argv))
        return [r.getMessage() for r in caplog.records]

    assert warnings([]) == []
    assert warnings(["--gradual_latent_ratio", "0.25", "--gradual_latent_timesteps", "500",
                     "--sampler", "euler_a"]) == []
    assert warnings(["--ds_ratio", "0.3", "--ds_depth_1", "2"]) == []
    [gl] = warnings(["--gradual_latent_ratio", "0.25", "--gradual_latent_every_n_steps", "2"])
    assert "--gradual_latent_ratio, --gradual_latent_every_n_steps without --gradual_latent_timesteps" in gl
    assert "--glt" in gl
    ds_and_gl = warnings(["--ds_ratio", "0.3", "--gradual_latent_s_noise", "0.9"])
    assert len(ds_and_gl) == 2 and "--ds_ratio without --ds_depth_1" in ds_and_gl[0] and "--dsd1" in ds_and_gl[0]
