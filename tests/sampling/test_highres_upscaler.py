"""Hires fix with an upscaler plug-in: `--highres_fix_upscaler` / `--highres_fix_upscaler_args` (spec generation
§1.4, §7). Oracle: our pipeline's 1st stage and img2img entry run by hand, the 2nd stage starting from the
plug-in's output."""
from __future__ import annotations

import logging
import os
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gen_img
from library.sampling.pipeline import GenSettings, HiresSettings, ImageSpec, Pipeline
from library.sampling.upscaler import parse_upscaler_args
from tests.sampling.test_controlnet import _exit_line

PROMPT = "a photo of a cat"


class RecordingUpscaler:
    """Upscales deterministically (nearest for images, nearest + offset for latents) and records each call."""

    def __init__(self, latents: bool):
        self.latents = latents
        self.calls: list[tuple] = []

    def support_latents(self) -> bool:
        return self.latents

    def upscale(self, vae, images, latents, dtype, width, height, batch_size, vae_batch_size):
        self.calls.append((vae, images, None if latents is None else latents.clone(), dtype, width, height,
                           batch_size, vae_batch_size))
        if self.latents:
            return F.interpolate(latents, size=(height // 8, width // 8), mode="nearest") + 0.25
        return [im.resize((width, height), Image.NEAREST) for im in images]


def _arr(images):
    return np.stack([np.asarray(im) for im in images])


@pytest.mark.parametrize("latents", [False, True])
def test_second_stage_starts_from_upscaler_output(sd1, latents):
    pipe = Pipeline(sd1, progress=False)
    specs = [ImageSpec(PROMPT, seed=3), ImageSpec(PROMPT, "blurry", seed=7)]
    settings = GenSettings(128, 96, steps=4, sampler="euler")
    ups = RecordingUpscaler(latents)
    first, final = pipe.generate_hires(specs, settings, HiresSettings(0.5, steps=3, upscaler=ups))

    # 1st stage by hand: 64x64 (floored to 32: 48 -> 32 for the height), 3 steps, same seeds
    first_settings = replace(settings, width=64, height=32, steps=3)
    latents1 = pipe.generate_latents(specs, first_settings)
    assert np.array_equal(_arr(first), _arr(pipe.decode(latents1)))
    assert len(ups.calls) == 1  # once per batch
    vae, images, lat, dtype, width, height, batch_size, vae_batch_size = ups.calls[0]
    assert vae is sd1.vae and dtype == torch.float32 and (width, height) == (128, 96)
    assert (batch_size, vae_batch_size) == (2, 2)  # no --vae_batch_size: the whole batch
    second_specs = [replace(s, seed=s.seed + 1) for s in specs]
    second_settings = replace(settings, strength=0.8)
    if latents:
        assert images is None and torch.equal(lat, latents1)
        init = F.interpolate(latents1, size=(12, 16), mode="nearest") + 0.25
        expected = pipe.decode(pipe.generate_latents(second_specs, second_settings, init_latents=init))
    else:
        assert lat is None and np.array_equal(_arr(images), _arr(first))
        second_specs = [replace(s, init_image=im.resize((128, 96), Image.NEAREST))
                        for s, im in zip(second_specs, first)]
        expected = pipe.generate(second_specs, second_settings)
    assert np.array_equal(_arr(final), _arr(expected))
    # the plug-in's output matters: the default LANCZOS path gives another image
    _, default = pipe.generate_hires(specs, settings, HiresSettings(0.5, steps=3, latents_upscaling=latents))
    assert not np.array_equal(_arr(final), _arr(default))


def test_parse_upscaler_args():
    assert parse_upscaler_args("weights=a.safetensors; scale = 2;;x=a=b;") == {"weights": "a.safetensors",
                                                                              "scale": "2", "x": "a=b"}
    assert parse_upscaler_args(None) == {}


PLUGIN = """
import torch
from PIL import Image

KWARGS, CALLS, MOVES = [], [], []


class Upscaler(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        KWARGS.append(kwargs)

    def to(self, *args, **kwargs):
        MOVES.append(args)
        return super().to(*args, **kwargs)

    def support_latents(self):
        return False

    def upscale(self, vae, images, latents, dtype, width, height, batch_size=1, vae_batch_size=1):
        CALLS.append((None if images is None else [im.size for im in images], latents, dtype, width, height,
                      batch_size, vae_batch_size))
        return [im.resize((width, height), Image.LANCZOS) for im in images]


def create_upscaler(**kwargs):
    return Upscaler(**kwargs)
"""


def _plugin(tmp_path, monkeypatch, name, source=PLUGIN):
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))


def _gen(tiny_diffusers, out, *extra):
    return gen_img.main(["--ckpt", tiny_diffusers["sd1"], "--outdir", str(out), "--prompt", "a cat", "--W", "128",
                         "--H", "128", "--steps", "2", "--highres_fix_steps", "2", "--seed", "5",
                         "--sequential_file_name", *extra])


def test_gen_img_plugin_args_calls_and_image(tiny_diffusers, tmp_path, monkeypatch):
    """A plug-in doing the default LANCZOS resize reproduces the default hires fix exactly; args are strings."""
    import sys

    _plugin(tmp_path, monkeypatch, "hires_ups_lanczos")
    extra = ["--images_per_prompt", "3", "--batch_size", "2", "--highres_fix_scale", "0.5"]
    paths = _gen(tiny_diffusers, tmp_path / "plug", *extra, "--highres_fix_upscaler", "hires_ups_lanczos",
                 "--highres_fix_upscaler_args", "weights=w.safetensors;scale=2")
    module = sys.modules["hires_ups_lanczos"]
    assert module.KWARGS == [{"weights": "w.safetensors", "scale": "2"}]
    assert module.MOVES == [(torch.float32,), (torch.device("cuda" if torch.cuda.is_available() else "cpu"),)]
    assert [c[0] for c in module.CALLS] == [[(64, 64)] * 2, [(64, 64)]]  # once per batch (3 images, batch 2)
    assert [c[1:] for c in module.CALLS] == [(None, torch.float32, 128, 128, 2, 2), (None, torch.float32, 128, 128, 1, 1)]
    default = _gen(tiny_diffusers, tmp_path / "default", *extra)
    assert [os.path.basename(p) for p in paths] == [os.path.basename(p) for p in default]
    for a, b in zip(paths, default):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("module, args, words", [
    ("no_such_upscaler_module_xyz", None, ["no_such_upscaler_module_xyz", "cannot import"]),
    ("hires_ups_empty", None, ["hires_ups_empty", "create_upscaler"]),
    ("hires_ups_lanczos2", "weights=a;scale", ["--highres_fix_upscaler_args", "'scale'", "key=value"]),
])
def test_bad_upscaler_exits_2(tiny_diffusers, tmp_path, monkeypatch, capsys, module, args, words):
    """Malformed args are refused before any model is loaded (the only stderr line)."""
    _plugin(tmp_path, monkeypatch, "hires_ups_empty", "X = 1\n")
    _plugin(tmp_path, monkeypatch, "hires_ups_lanczos2")
    argv = ["--ckpt", tiny_diffusers["sd1"], "--outdir", str(tmp_path), "--prompt", "x", "--W", "64", "--H", "64",
            "--steps", "2", "--highres_fix_scale", "0.5", "--highres_fix_upscaler", module]
    msg = _exit_line(capsys, argv + (["--highres_fix_upscaler_args", args] if args else []),
                     before_loading=bool(args))
    assert all(w in msg for w in words), msg


def test_upscaler_without_hires_fix_warns(tiny_diffusers, tmp_path, caplog):
    """Upstream loads it and never uses it: we say so and do not import it."""
    with caplog.at_level(logging.WARNING):
        paths = gen_img.main(["--ckpt", tiny_diffusers["sd1"], "--outdir", str(tmp_path), "--prompt", "x", "--W", "64",
                              "--H", "64", "--steps", "2", "--highres_fix_upscaler", "no_such_upscaler_module_xyz"])
    assert len(paths) == 1
    assert any("--highres_fix_upscaler does nothing without --highres_fix_scale" in r.getMessage()
               for r in caplog.records)
