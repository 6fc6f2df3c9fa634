"""Deep Shrink (`--ds_*`, prompt options `--dsd1/--dst1/--dsd2/--dst2/--dsr`) on tiny SD1 / SDXL U-Nets.

Oracle: a hand-written forward of the tiny SD1 U-Net built from its Diffusers submodules, with the upstream
resizing (bicubic shrink before one down block, resize to the skip before each concatenation).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gen_img
import library.sampling.pipeline as pipeline_module
from library.errors import UserError
from library.sampling.deep_shrink import (DeepShrink, deep_shrink_unet, down_path_modules, resize_to,
                                          resolve_deep_shrink)
from library.sampling.pipeline import GenSettings, HiresSettings, ImageSpec, Pipeline

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny(tiny_diffusers):
    return tiny_diffusers


def _input_sizes(module: torch.nn.Module) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Spatial sizes of the first input of every call of `module` (a forward hook: after any pre-hook)."""
    sizes: list = []

    def hook(_m, args, kwargs, _out):
        x = args[0] if args else kwargs["hidden_states"]
        sizes.append(tuple(x.shape[-2:]))
    return sizes, module.register_forward_hook(hook, with_kwargs=True)


def _is_restored(unet) -> bool:
    return (not unet._forward_pre_hooks and all("forward" not in b.__dict__ for b in unet.up_blocks)
            and all(not m._forward_pre_hooks for m in unet.modules()))


# ---------------------------------------------------------------- settings

def test_shrinks_at_follows_upstream_conditions():
    s = DeepShrink(depth_1=3, timesteps_1=650, depth_2=1, timesteps_2=300)
    assert s.shrinks_at(3, 650) and s.shrinks_at(3, 999) and not s.shrinks_at(3, 649)
    assert s.shrinks_at(1, 649) and s.shrinks_at(1, 300) and not s.shrinks_at(1, 299) and not s.shrinks_at(1, 650)
    assert not s.shrinks_at(2, 999)
    assert not DeepShrink(3, 650, depth_2=1).shrinks_at(1, 500)  # timesteps_2 None = upstream's 1000
    with pytest.raises(UserError, match="ratio must be > 0"):
        DeepShrink(3, ratio=0.0)


def test_resolve_line_overrides_and_defaults():
    cli = dict(depth_1=None, timesteps_1=650, depth_2=None, timesteps_2=650, ratio=0.5)
    assert resolve_deep_shrink(*cli.values()) is None
    assert resolve_deep_shrink(*cli.values(), line={"ds_ratio": 0.75}) == DeepShrink(3, 650, None, 650, 0.75)
    assert resolve_deep_shrink(2, 700, 1, 400, 0.5, line={"ds_timesteps_1": 800}) == DeepShrink(2, 800, 1, 400, 0.5)
    assert resolve_deep_shrink(0, 650, None, 650, 0.5, line={"ds_depth_2": 2}).depth_1 == 0
    assert resolve_deep_shrink(*cli.values(), line={"width": 64}) is None  # other line options do not enable it


def test_resize_to_keeps_dtype_and_skips_equal_sizes():
    x = torch.randn(1, 4, 8, 8)
    assert resize_to(x, size=(8, 8)) is x
    y = resize_to(x.bfloat16(), scale=0.5)
    assert y.dtype == torch.bfloat16 and y.shape[-2:] == (4, 4)
    expected = F.interpolate(x.bfloat16().float(), scale_factor=0.5, mode="bicubic", align_corners=False)
    torch.testing.assert_close(y, expected.bfloat16())


# ---------------------------------------------------------------- one U-Net call: oracle

def _reference_forward(unet, x, t, ctx, depth: int | None, ratio: float = 0.5):
    """SD1 Diffusers U-Net forward written out, shrinking before down_blocks[depth] (None: never)."""
    def bicubic(h, **kw):
        return F.interpolate(h, mode="bicubic", align_corners=False, **kw)

    emb = unet.time_embedding(unet.time_proj(t.expand(x.shape[0])).to(x.dtype))
    h = unet.conv_in(x)
    skips = [h]
    for i, block in enumerate(unet.down_blocks):
        if i == depth:
            h = bicubic(h, scale_factor=ratio)
        for j, resnet in enumerate(block.resnets):
            h = resnet(h, emb)
            if getattr(block, "attentions", None):
                h = block.attentions[j](h, encoder_hidden_states=ctx).sample
            skips.append(h)
        if block.downsamplers:
            h = block.downsamplers[0](h)
            skips.append(h)
    h = unet.mid_block(h, emb, encoder_hidden_states=ctx)
    for block in unet.up_blocks:
        for j, resnet in enumerate(block.resnets):
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = bicubic(h, size=skip.shape[-2:])
            h = resnet(torch.cat([h, skip], dim=1), emb)
            if getattr(block, "attentions", None):
                h = block.attentions[j](h, encoder_hidden_states=ctx).sample
        if block.upsamplers:
            h = block.upsamplers[0](h)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


@pytest.mark.parametrize("setting, t, ref_depth", [
    (DeepShrink(1, 650), 900, 1),
    (DeepShrink(0, 650, ratio=0.75), 900, 0),
    (DeepShrink(3, 650), 700, 3),
    (DeepShrink(3, 950, depth_2=2, timesteps_2=500), 900, 2),  # second stage: 500 <= t < 950
    (DeepShrink(1, 650), 100, None),
])
@torch.no_grad()
def test_patched_unet_matches_reference(sd1, setting, t, ref_depth):
    unet = sd1.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(t)
    with deep_shrink_unet(unet, setting, sdxl=False):
        out = unet(x, t, encoder_hidden_states=ctx).sample
    assert _is_restored(unet)
    expected = _reference_forward(unet, x, t, ctx, ref_depth, setting.ratio)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    plain = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(out, plain) == (ref_depth is None)


# ---------------------------------------------------------------- the pipeline

def _latents(models, settings, seed=3):
    return Pipeline(models, progress=False).generate_latents([ImageSpec(PROMPT, seed=seed)], settings)


def test_pipeline_never_applying_is_bit_identical(sd1):
    plain = _latents(sd1, GenSettings(64, 64, steps=3, sampler="euler"))
    never = _latents(sd1, GenSettings(64, 64, steps=3, sampler="euler", deep_shrink=DeepShrink(1, 1001)))
    assert torch.equal(plain, never)


def test_pipeline_shrinks_at_the_chosen_block(sd1):
    sizes, handle = _input_sizes(sd1.unet.down_blocks[1].resnets[0])
    try:
        plain = _latents(sd1, GenSettings(64, 64, steps=2))
        n_plain = len(sizes)
        shrunk = _latents(sd1, GenSettings(64, 64, steps=2, deep_shrink=DeepShrink(1, 0)))
    finally:
        handle.remove()
    assert set(sizes[:n_plain]) == {(4, 4)} and set(sizes[n_plain:]) == {(2, 2)}  # latent 8 -> block 1 at 4
    assert shrunk.shape == plain.shape == (1, 4, 8, 8)
    assert not torch.allclose(shrunk, plain)
    assert _is_restored(sd1.unet)


def test_hires_fix_shrinks_both_stages(sd1):
    sizes, handle = _input_sizes(sd1.unet.down_blocks[1].resnets[0])
    try:
        Pipeline(sd1, progress=False).generate_hires(
            [ImageSpec(PROMPT, seed=1)], GenSettings(128, 128, steps=2, deep_shrink=DeepShrink(1, 0)),
            HiresSettings(0.5, steps=2))
    finally:
        handle.remove()
    assert set(sizes) == {(2, 2), (4, 4)} and _is_restored(sd1.unet)  # 64 px, then 128 px (unshrunk: 4, 8)


@pytest.mark.parametrize("depth, expected", [(0, (4, 4)), (3, (4, 4)), (4, (2, 2))])
def test_sdxl_counts_input_blocks(sdxl, depth, expected):
    """SDXL depths index LDM input_blocks: 0 conv_in, 1-2 resnets, 3 downsampler, 4-5 resnets (latent 8)."""
    target = down_path_modules(sdxl.unet, sdxl=True)[depth]
    sizes, handle = _input_sizes(target)
    try:
        plain = _latents(sdxl, GenSettings(64, 64, steps=2))
        shrunk = _latents(sdxl, GenSettings(64, 64, steps=2, deep_shrink=DeepShrink(depth, 0)))
    finally:
        handle.remove()
    assert sizes[-1] == expected and shrunk.shape == plain.shape
    assert torch.isfinite(shrunk).all() and not torch.allclose(shrunk, plain)
    assert _is_restored(sdxl.unet)


# ---------------------------------------------------------------- gen_img

def _gen(tiny, tmp_path, *extra, family="sd1", outdir="out"):
    out = tmp_path / outdir
    paths = gen_img.main(["--ckpt", tiny[family], "--outdir", str(out), "--W", "64", "--H", "64", "--steps", "2",
                          "--sequential_file_name", *extra])
    return [np.asarray(Image.open(p)) for p in paths]


def test_prompt_options_enable_it_for_their_line_only(tiny, tmp_path, monkeypatch):
    used = []
    real = pipeline_module.deep_shrink_unet

    def recording(unet, setting, sdxl):
        used.append(setting)
        return real(unet, setting, sdxl)
    monkeypatch.setattr(pipeline_module, "deep_shrink_unet", recording)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT} --d 5 --dsd1 1 --dst1 0 --dsr 0.5\n{PROMPT} --d 5\n", encoding="utf-8")
    shrunk, plain = _gen(tiny, tmp_path, "--from_file", str(prompts), "--batch_size", "2")
    assert used == [DeepShrink(1, 0, None, 650, 0.5), None]  # two batches: the settings differ
    assert not np.array_equal(shrunk, plain)
    (alone,) = _gen(tiny, tmp_path, "--prompt", f"{PROMPT} --d 5", outdir="alone")
    assert np.array_equal(plain, alone)


def test_command_line_deep_shrink_sdxl(tiny, tmp_path):
    (shrunk,) = _gen(tiny, tmp_path, "--prompt", f"{PROMPT} --d 2", "--ds_depth_1", "3", "--ds_timesteps_1", "0",
                     family="sdxl")
    (plain,) = _gen(tiny, tmp_path, "--prompt", f"{PROMPT} --d 2", family="sdxl", outdir="plain")
    assert shrunk.shape == plain.shape == (64, 64, 3) and not np.array_equal(shrunk, plain)


@pytest.mark.parametrize("extra, message", [
    (["--ds_depth_1", "1", "--ds_ratio", "0"], "--ds_ratio 0.0 is out of range: it must be > 0"),
    (["--ds_depth_1", "-1"], "--ds_depth_1 -1 is out of range: it must be >= 0"),
    (["--prompt", "a cat --dsr 0"], "prompt option --dsr 0.0 is out of range: it must be > 0 (as --ds_ratio): a cat --dsr 0"),
])
def test_bad_values_exit_2_with_one_line(tiny, tmp_path, capsys, extra, message):
    argv = ["--ckpt", tiny["sd1"], "--outdir", str(tmp_path / "o"), *extra]
    if "--prompt" not in extra:
        argv += ["--prompt", "a cat"]
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")


def test_shrinking_a_map_to_nothing_is_a_clear_error(tiny, tmp_path, capsys):
    argv = ["--ckpt", tiny["sd1"], "--outdir", str(tmp_path / "o"), "--prompt", "a cat --d 1", "--W", "64", "--H", "64",
            "--ds_depth_1", "1", "--ds_timesteps_1", "0", "--ds_ratio", "0.1", "--steps", "2"]
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "would shrink to nothing with ratio 0.1" in err and "--ds_depth" in err
