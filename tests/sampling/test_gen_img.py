"""gen_img.py end to end on tiny models: files, names, PNG text, seeds, options, errors (spec generation §1-§9)."""
from __future__ import annotations

import io
import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import gen_img
from library.sampling.gen_options import build_gen_parser
from library.sampling.samplers import SAMPLERS
from tools.make_tiny_model import write_tiny_model

SMALL = ["--W", "64", "--H", "64", "--steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_gen")
    sd1 = write_tiny_model("sd1", out, formats=("safetensors",))["safetensors"]
    sdxl = write_tiny_model("sdxl", out, formats=("diffusers",))["diffusers"]
    return {"sd1": str(sd1), "sdxl": str(sdxl)}


def _run(tiny, tmp_path, *extra, family="sd1", outdir="out", size=True):
    out = tmp_path / outdir
    paths = gen_img.main(["--ckpt", tiny[family], "--outdir", str(out), *(SMALL if size else SMALL[-2:]), *extra])
    return [os.path.basename(p) for p in paths], out


def _exit_message(capsys, argv):
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_names_and_png_text(tiny, tmp_path):
    names, out = _run(tiny, tmp_path, "--prompt", "a {red|blue} cat --n ugly --d 5,6 --l 5", "--images_per_prompt",
                      "3", "--batch_size", "2", "--seed", "1")
    assert [n.rsplit("_", 1)[1] for n in names] == ["5.png", "6.png", "6.png"]  # last --d seed reused
    assert all(re.fullmatch(r"im_\d{14}_\d{3}_\d+\.png", n) for n in names)
    text = Image.open(out / names[0]).text
    for key in ("prompt", "seed", "sampler", "steps", "scale", "negative-prompt", "raw-prompt", "parameters"):
        assert key in text
    assert text["prompt"] in ("a red cat", "a blue cat") and text["negative-prompt"] == "ugly"
    assert text["seed"] == "5" and text["scale"] == "5.0" and text["steps"] == "2" and text["sampler"] == "ddim"
    assert text["raw-prompt"].endswith("--n ugly --d 5,6 --l 5")
    params = text["parameters"].splitlines()
    assert params[1] == "Negative prompt: ugly"
    assert params[2] == "Steps: 2, Sampler: DDIM, CFG scale: 5.0, Seed: 5, Size: 64x64, Model: sd1"


def test_seeds_g_semantics(tiny, tmp_path):
    # one prompt, one image, --seed: the seed itself (spec pitfall 6, fixed)
    names, _ = _run(tiny, tmp_path, "--prompt", "a cat", "--seed", "1234", outdir="a")
    assert names[0].endswith("_1234.png")
    # more images: drawn from Random(seed) in [0, 2^32-1], reproducibly
    names, out = _run(tiny, tmp_path, "--prompt", "a cat", "--seed", "7", "--images_per_prompt", "2", outdir="b")
    rnd = random.Random(7)
    assert [int(n.rsplit("_", 1)[1][:-4]) for n in names] == [rnd.randint(0, 2**32 - 1) for _ in range(2)]
    again, out2 = _run(tiny, tmp_path, "--prompt", "a cat", "--seed", "7", "--images_per_prompt", "2", outdir="c")
    assert [n.split("_", 2)[2] for n in names] == [n.split("_", 2)[2] for n in again]
    assert np.array_equal(np.asarray(Image.open(out / names[1])), np.asarray(Image.open(out2 / again[1])))


def test_sequential_names_and_batch_split(tiny, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# comment\na cat --w 64\n\na dog --w 128\na bird --w 64\n", encoding="utf-8")
    names, out = _run(tiny, tmp_path, "--from_file", str(prompts), "--sequential_file_name", "--batch_size", "4",
                      "--n_iter", "2")
    assert names == [f"im_{i:06d}.png" for i in range(1, 7)]
    assert [Image.open(out / n).size[0] for n in names] == [64, 128, 64] * 2


def test_hires_fix_prefixes_and_sizes(tiny, tmp_path):
    names, out = _run(tiny, tmp_path, "--prompt", "a cat", "--W", "128", "--H", "128", "--highres_fix_scale", "0.5",
                      "--highres_fix_steps", "2", "--highres_fix_save_1st", "--sequential_file_name")
    assert names == ["im_0000001.png", "im_1000001.png"]
    assert Image.open(out / names[0]).size == (64, 64) and Image.open(out / names[1]).size == (128, 128)


def test_img2img_original_names_and_prompt_from_png(tiny, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    info = PngInfo()
    info.add_text("prompt", "a red house")
    info.add_text("negative-prompt", "fog")
    Image.new("RGB", (100, 70), (200, 30, 30)).save(src / "house.png", pnginfo=info)
    names, out = _run(tiny, tmp_path, "--image_path", str(src), "--use_original_file_name", "--strength", "0.5",
                      size=False)
    assert names == ["house.png"]
    image = Image.open(out / "house.png")
    assert image.size == (96, 64)  # floored to multiples of 32 (spec §2)
    assert image.text["prompt"] == "a red house" and image.text["negative-prompt"] == "fog"


def test_inpaint_runs(tiny, tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    names, out = _run(tiny, tmp_path, "--prompt", "a cat", "--image_path", str(tmp_path / "init.png"),
                      "--mask_path", str(tmp_path / "mask.png"))
    assert len(names) == 1


def test_sdxl_png_size_keys(tiny, tmp_path):
    names, out = _run(tiny, tmp_path, "--prompt", "a cat --ow 512", "--original_height", "256", family="sdxl")
    text = Image.open(out / names[0]).text
    assert text["original-width"] == "512" and text["original-height"] == "256"
    assert text["crop-top"] == "None"  # not given: written as None (spec §9)


def test_interactive_reads_stdin(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a cat --d 3\n\na dog --d 4\n"))
    names, _ = _run(tiny, tmp_path, "--interactive")
    assert [n.rsplit("_", 1)[1] for n in names] == ["3.png", "4.png"]


def test_from_module_prompter(tiny, tmp_path):
    module = tmp_path / "prompter.py"
    module.write_text("def get_prompter(args, pipe, networks):\n"
                      "    def prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step):\n"
                      "        return None if prompt_index >= 2 else f'thing {prompt_index} --d {10 + prompt_index}'\n"
                      "    return prompter\n", encoding="utf-8")
    names, _ = _run(tiny, tmp_path, "--from_module", str(module))
    assert [n.rsplit("_", 1)[1] for n in names] == ["10.png", "11.png"]


def test_textual_inversion_option(tiny, tmp_path):
    from library.formats.ti_embedding import embedding_state_dict, save_embedding_file

    save_embedding_file(tmp_path / "shiny.safetensors", embedding_state_dict(torch.randn(2, 32)))
    names, _ = _run(tiny, tmp_path, "--prompt", "a shiny cat", "--textual_inversion_embeddings",
                    str(tmp_path / "shiny.safetensors"))
    assert len(names) == 1


def _make_lora(tiny, path):
    lora = pytest.importorskip("networks.lora", reason="networks.lora not available")
    from library.models.loading import load_models

    models = load_models(tiny["sd1"])
    net = lora.create_network(1.0, 4, 4, models.vae, models.text_encoders[0], models.unet)
    net.apply_to(models.text_encoders[0], models.unet)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    net.save_weights(str(path), torch.float32, None)


def _pixels(out, name):
    return np.asarray(Image.open(out / name), dtype=np.int16)


def test_lora_multiplier_zero_and_merge(tiny, tmp_path):
    _make_lora(tiny, tmp_path / "lora.safetensors")
    base = ["--prompt", "a cat --d 1"]
    net = ["--network_module", "networks.lora", "--network_weights", str(tmp_path / "lora.safetensors")]
    b, out_b = _run(tiny, tmp_path, *base, outdir="base")
    z, out_z = _run(tiny, tmp_path, *base, *net, "--network_mul", "0", outdir="zero")
    a, out_a = _run(tiny, tmp_path, *base, *net, outdir="applied")
    m, out_m = _run(tiny, tmp_path, *base, *net, "--network_merge", outdir="merged")
    p, out_p = _run(tiny, tmp_path, *base, *net, "--network_pre_calc", outdir="precalc")
    assert np.array_equal(_pixels(out_b, b[0]), _pixels(out_z, z[0]))  # multiplier 0 = base model
    assert not np.array_equal(_pixels(out_b, b[0]), _pixels(out_a, a[0]))
    assert np.abs(_pixels(out_a, a[0]) - _pixels(out_m, m[0])).max() <= 1  # merged = applied (rounding)
    assert np.abs(_pixels(out_a, a[0]) - _pixels(out_p, p[0])).max() <= 1
    # --am per line: multiplier 0 again gives the base image
    am, out_am = _run(tiny, tmp_path, "--prompt", "a cat --d 1 --am 0", *net, outdir="am")
    assert np.array_equal(_pixels(out_b, b[0]), _pixels(out_am, am[0]))


def test_unknown_sampler_lists_valid_ones(tiny, capsys):
    msg = _exit_message(capsys, ["--ckpt", tiny["sd1"], "--prompt", "x", "--sampler", "nope"])
    assert "nope" in msg and all(name in msg for name in SAMPLERS)


@pytest.mark.parametrize("extra, option", [
    (["--XTI_embeddings", "x.pt"], "--XTI_embeddings"),
    (["--clip_guidance_scale", "1.0"], "--clip_guidance_scale"),
    (["--guide_image_path", "g.png"], "--guide_image_path"),
    (["--clip_vision_strength", "0.5"], "--clip_vision_strength"),
])
def test_unsupported_options_rejected(tiny, capsys, extra, option):
    msg = _exit_message(capsys, ["--ckpt", tiny["sd1"], "--prompt", "x", *extra])
    assert option in msg and "not supported yet" in msg


def test_inline_options_checked_before_loading(tiny, capsys):
    """A line's Gradual Latent needs Euler-a (the default sampler is ddim): refused, naming the line."""
    msg = _exit_message(capsys, ["--ckpt", tiny["sd1"], "--prompt", "x --glt 650"])
    assert "Gradual Latent" in msg and "euler_a" in msg and msg.endswith(": x --glt 650")


def test_missing_ckpt_and_bad_inputs(tmp_path, capsys):
    msg = _exit_message(capsys, ["--ckpt", str(tmp_path / "none.safetensors"), "--prompt", "x"])
    assert "none.safetensors" in msg and msg.startswith("error:")
    msg = _exit_message(capsys, ["--ckpt", str(tmp_path / "none.safetensors")])
    assert "no prompt" in msg
    msg = _exit_message(capsys, ["--ckpt", "x", "--prompt", "x", "--mask_path", str(tmp_path)])
    assert "--mask_path needs --image_path" in msg


def test_xformers_missing_is_clear(tiny, capsys):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    msg = _exit_message(capsys, ["--ckpt", tiny["sd1"], "--prompt", "x", "--xformers", *SMALL])
    assert "--xformers needs xformers" in msg


def test_parser_defaults_match_spec():
    args = build_gen_parser().parse_args([])
    assert (args.steps, args.sampler, args.scale, args.outdir, args.images_per_prompt, args.n_iter,
            args.batch_size, args.highres_fix_steps, args.emb_normalize_mode) == (50, "ddim", 7.5, "outputs", 1, 1,
                                                                                    1, 28, "original")
    assert args.W is None and args.H is None and args.clip_skip is None and args.strength is None
