"""ControlNet v1.x in gen_img (spec generation §1.4-1.5). Oracles: diffusers' ControlNetModel weights and
StableDiffusionControlNetPipeline, the U-Net's own LDM key table, hook counts."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import gen_img
from library.models.key_rules import model_to_ldm
from library.models.unet_keys import unet_rules
from library.sampling.controlnet import (ControlNetOption, LoadedControlNet, control_net_to_ldm, load_control_net,
                                         parse_prep)
from library.sampling.pipeline import GenSettings, ImageSpec, Pipeline, draw_noise, make_generators
from library.sampling.samplers import make_scheduler

PROMPT, NEG = "a photo of a cat", "blurry"


def _tiny_control_net(unet, seed=0):
    """diffusers' ControlNet copied from the tiny U-Net, every weight perturbed (zero convs are zero otherwise)."""
    from diffusers import ControlNetModel

    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return cn.eval()


@pytest.fixture(scope="module")
def control_net(sd1):
    return _tiny_control_net(sd1.unet)


@pytest.fixture(scope="module")
def ldm_file(control_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("cn") / "control_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in control_net_to_ldm(control_net).items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def hint():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_ldm_layout_and_round_trip(sd1, control_net, ldm_file):
    """The LDM file has the original layout (encoder = U-Net LDM names, 12-style zero convs, hint convs at even
    indices) and loads back into tensors equal to diffusers' model."""
    from safetensors.torch import load_file

    ldm = load_file(ldm_file)
    unet_ldm = model_to_ldm(sd1.unet.state_dict(), unet_rules(list(sd1.unet.state_dict()), sd1.unet.config))
    encoder = {k for k in unet_ldm if k.startswith(("input_blocks.", "middle_block.", "time_embed."))}
    assert {k[len("control_model."):] for k in ldm if not k.startswith(
        ("control_model.zero_convs.", "control_model.input_hint_block.", "control_model.middle_block_out."))} == encoder
    cfg = sd1.unet.config
    n_zero = 1 + len(cfg.block_out_channels) * cfg.layers_per_block + len(cfg.block_out_channels) - 1
    assert {k for k in ldm if k.startswith("control_model.zero_convs.")} == {
        f"control_model.zero_convs.{i}.0.{p}" for i in range(n_zero) for p in ("weight", "bias")}
    assert {k.split(".")[2] for k in ldm if "input_hint_block" in k} == {str(i) for i in range(0, 16, 2)}
    assert ldm["control_model.input_hint_block.0.weight"].shape == (8, 3, 3, 3)
    assert ldm["control_model.input_hint_block.14.weight"].shape == (cfg.block_out_channels[0], 32, 3, 3)
    assert ldm["control_model.middle_block_out.0.weight"].shape[:2] == (cfg.block_out_channels[-1],) * 2
    loaded = load_control_net(ldm_file, sd1.unet)
    want, got = control_net.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_diffusers_file_and_folder(sd1, control_net, tmp_path):
    save_file({k: v.contiguous() for k, v in control_net.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    control_net.save_pretrained(str(tmp_path / "folder"))
    for path in (tmp_path / "cn.safetensors", tmp_path / "folder"):
        got = load_control_net(str(path), sd1.unet).state_dict()
        assert all(torch.equal(v, got[k]) for k, v in control_net.state_dict().items())


def test_difference_file_adds_base_unet(sd1, control_net, tmp_path):
    """Transfer Control ("difference" key): encoder tensors are base U-Net + file."""
    ldm = control_net_to_ldm(control_net)
    base = model_to_ldm(sd1.unet.state_dict(), unet_rules(list(sd1.unet.state_dict()), sd1.unet.config))
    diff = {k: (v - base[k[len("control_model."):]]) if k[len("control_model."):] in base else v
            for k, v in ldm.items()}
    diff["difference"] = torch.tensor(1.0)
    save_file({k: v.contiguous() for k, v in diff.items()}, str(tmp_path / "diff.safetensors"))
    got = load_control_net(str(tmp_path / "diff.safetensors"), sd1.unet).state_dict()
    for k, v in control_net.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def _pipe(models, nets):
    return Pipeline(models, progress=False, control_nets=nets)


def _net(model, **kw):
    return LoadedControlNet(model, ControlNetOption("cn", **kw))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_matches_diffusers_controlnet_pipeline(tiny_diffusers, sd1, control_net, hint, sampler):
    from diffusers import StableDiffusionControlNetPipeline

    seeds = [1, 2]
    specs = [ImageSpec(PROMPT, NEG, seed=s, control_images=(hint,)) for s in seeds]
    settings = GenSettings(64, 64, steps=4, scale=7.5, sampler=sampler)
    ours = _pipe(sd1, [_net(control_net)]).generate_latents(specs, settings)
    plain = _pipe(sd1, []).generate_latents(specs, settings)
    assert (ours - plain).abs().max() > 1e-3  # the ControlNet really changes the result

    ref = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_diffusers["sd1"], controlnet=control_net, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler(sampler, False, False)
    gens = make_generators(seeds)
    latents = draw_noise(gens, (4, 8, 8), torch.device("cpu"))
    ref_lat = ref([PROMPT] * 2, image=hint, negative_prompt=[NEG] * 2, height=64, width=64, num_inference_steps=4,
                  guidance_scale=7.5, latents=latents, generator=gens, output_type="latent").images
    assert (ours - ref_lat).abs().max().item() <= 1e-4 * max(1.0, ref_lat.abs().max().item())


def _calls(model):
    calls = []
    return calls, model.register_forward_hook(lambda *a: calls.append(1))


def test_ratio_weight_and_alternation(sd1, control_net, hint):
    specs = [ImageSpec(PROMPT, NEG, seed=5, control_images=(hint,))]
    settings = GenSettings(64, 64, steps=4, scale=7.5)
    calls, handle = _calls(control_net)
    try:
        half = _pipe(sd1, [_net(control_net, ratio=0.5)]).generate_latents(specs, settings)
        assert len(calls) == 3  # upstream: used while step/steps <= ratio -> steps 0, 1, 2 of 4
        calls.clear()
        full = _pipe(sd1, [_net(control_net)]).generate_latents(specs, settings)
        assert len(calls) == 4
        calls.clear()
        zero = _pipe(sd1, [_net(control_net, weight=0.0)]).generate_latents(specs, settings)
        assert len(calls) == 4
    finally:
        handle.remove()
    plain = _pipe(sd1, []).generate_latents(specs, settings)
    assert torch.equal(zero, plain)
    assert not torch.allclose(half, full) and not torch.allclose(half, plain)
    # two ControlNets alternate by step (upstream), each seeing its own hint
    other = _tiny_control_net(sd1.unet, seed=1)
    c1, h1 = _calls(control_net)
    c2, h2 = _calls(other)
    try:
        two = [ImageSpec(PROMPT, NEG, seed=5, control_images=(hint, hint.rotate(90)))]
        _pipe(sd1, [_net(control_net), _net(other)]).generate_latents(two, settings)
    finally:
        h1.remove()
        h2.remove()
    assert (len(c1), len(c2)) == (2, 2)


def test_parse_prep():
    assert parse_prep("none") is None and parse_prep(None) is None
    assert parse_prep("canny") == (63, 191) and parse_prep("canny_10") == (10, 191)
    assert parse_prep("canny_63_191") == (63, 191)
    with pytest.raises(Exception, match="unknown preprocess"):
        parse_prep("depth")


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    from tools.make_tiny_model import write_tiny_model

    return str(write_tiny_model("sd1", tmp_path_factory.mktemp("cn_gen"), formats=("safetensors",))["safetensors"])


def _ldm_for(models_path, tmp_path):
    from library.models.loading import load_models

    unet = load_models(models_path).unet
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in control_net_to_ldm(_tiny_control_net(unet)).items()}, str(path))
    return str(path)


def test_gen_img_end_to_end(sd1_file, hint, tmp_path):
    cn = _ldm_for(sd1_file, tmp_path)
    hint.save(tmp_path / "hint.png")
    base = ["--ckpt", sd1_file, "--W", "64", "--H", "64", "--steps", "3", "--seed", "7", "--prompt", "a cat"]
    with_cn = gen_img.main(base + ["--outdir", str(tmp_path / "a"), "--control_net_models", cn,
                                   "--control_net_preps", "none", "--control_net_ratios", "1",
                                   "--control_net_weights", "1.0", "--guide_image_path", str(tmp_path / "hint.png")])
    without = gen_img.main(base + ["--outdir", str(tmp_path / "b")])
    assert len(with_cn) == 1 and len(without) == 1
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (with_cn[0], without[0]))
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() > 0
    # hires fix: ControlNet in both stages, or only the first with --highres_fix_disable_control_net
    hires = gen_img.main(base + ["--outdir", str(tmp_path / "c"), "--control_net_models", cn, "--guide_image_path",
                                 str(tmp_path / "hint.png"), "--highres_fix_scale", "0.5", "--highres_fix_steps", "2",
                                 "--highres_fix_disable_control_net"])
    assert len(hires) == 1


def _exit_line(capsys, argv, before_loading=True):
    """Exit code 2 with a one-line error (the only stderr line when refused before any model is loaded)."""
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    if before_loading:
        assert len(err) == 1, err
    return err[-1]


def test_errors(sd1_file, tiny_diffusers, tmp_path, capsys, monkeypatch):
    cn = _ldm_for(sd1_file, tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "g.png")
    base = ["--ckpt", sd1_file, "--prompt", "x", "--outdir", str(tmp_path / "o"), "--W", "64", "--H", "64",
            "--steps", "1"]
    cnet = ["--control_net_models", cn, "--guide_image_path", str(tmp_path / "g.png")]
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    capsys.readouterr()
    msg = _exit_line(capsys, base + cnet + ["--control_net_preps", "canny_63_191"])
    assert "opencv-python" in msg and "--control_net_preps none" in msg
    msg = _exit_line(capsys, base + cnet + ["--control_net_ratios", "1", "0.5"])
    assert "--control_net_ratios has 2 value(s)" in msg
    msg = _exit_line(capsys, base + ["--control_net_models", cn])
    assert "--guide_image_path" in msg
    msg = _exit_line(capsys, base + cnet + ["--sdxl"])
    assert "SD1/SD2" in msg
    sdxl = ["--ckpt", tiny_diffusers["sdxl"], *base[2:]]
    msg = _exit_line(capsys, sdxl + cnet, before_loading=False)  # SDXL found by auto-detection
    assert "SD1/SD2" in msg
    msg = _exit_line(capsys, base + cnet + ["--ds_depth_1", "1"], before_loading=False)
    assert "Deep Shrink" in msg
    msg = _exit_line(capsys, base + ["--control_net_models", sd1_file, "--guide_image_path",
                                     str(tmp_path / "g.png")], before_loading=False)
    assert "not a ControlNet file" in msg
