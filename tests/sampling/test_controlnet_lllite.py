"""ControlNet-LLLite for SDXL in gen_img (spec generation §1.5). Oracles: a hand-written reference of upstream's
LLLiteModule (nn.Conv2d/nn.Linear stacks applied by forward pre-hooks on the diffusers U-Net's Linear layers, names
and depths by upstream's rules from the diffusers paths), bit-equality with multiplier 0, step counts."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import gen_img
from library.sampling.controlnet_lllite import ControlNetLLLite, LLLiteBatch, LLLiteOption
from library.sampling.pipeline import GenSettings, ImageSpec, Pipeline
from tests.sampling.test_controlnet import _exit_line

PROMPT, NEG = "a photo of a cat", "blurry"
COND, MLP = 8, 6


def _upstream_targets(unet):
    """{LLLite name: (diffusers path, upstream depth)}: attn1 q/k/v and attn2 q of the input and middle blocks."""
    lpb = unet.config["layers_per_block"]
    out = {}
    pat = re.compile(r"^(down_blocks\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.0)\.transformer_blocks\.(\d+)\."
                     r"(attn1\.to_[qkv]|attn2\.to_q)$")
    for path, _ in unet.named_modules():
        m = pat.match(path)
        if not m:
            continue
        if m.group(2) is not None:
            index = (lpb + 1) * int(m.group(2)) + int(m.group(3)) + 1
            block = f"input_blocks_{index}_1"
            depth = 1 if index <= 2 else (2 if index <= 5 else 3)
        else:
            block, depth = "middle_block_1", 3
        out[f"lllite_unet_{block}_transformer_blocks_{m.group(4)}_{m.group(5).replace('.', '_')}"] = (path, depth)
    return out


def _state_dict(unet, seed=0):
    """A random LLLite state dict with upstream's key names and shapes (non-zero `up`)."""
    g = torch.Generator().manual_seed(seed)
    convs = {1: [(3, COND // 2, 4), (COND // 2, COND, 2)], 2: [(3, COND // 2, 4), (COND // 2, COND, 4)],
             3: [(3, COND // 2, 4), (COND // 2, COND // 2, 4), (COND // 2, COND, 2)]}
    sd = {}
    mods = dict(unet.named_modules())
    for name, (path, depth) in _upstream_targets(unet).items():
        dim = mods[path].in_features
        for i, (cin, cout, k) in enumerate(convs[depth]):
            sd[f"{name}.conditioning1.{2 * i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.3
            sd[f"{name}.conditioning1.{2 * i}.bias"] = torch.randn(cout, generator=g) * 0.1
        for part, (o, i) in (("down", (MLP, dim)), ("mid", (MLP, MLP + COND)), ("up", (dim, MLP))):
            sd[f"{name}.{part}.0.weight"] = torch.randn(o, i, generator=g) * 0.3
            sd[f"{name}.{part}.0.bias"] = torch.randn(o, generator=g) * 0.1
    return sd


def _reference_hooks(unet, sd, hint, multiplier, count):
    """Upstream's LLLiteModule written out: x -> x + up(mid(cat[cond1(hint) as tokens, down(x)])) * multiplier."""
    mods = dict(unet.named_modules())
    handles = []
    for name, (path, depth) in _upstream_targets(unet).items():
        n_convs = {1: 2, 2: 2, 3: 3}[depth]
        layers = []
        for i in range(n_convs):
            w = sd[f"{name}.conditioning1.{2 * i}.weight"]
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], kernel_size=w.shape[-1], stride=w.shape[-1])
            conv.weight.data, conv.bias.data = w.clone(), sd[f"{name}.conditioning1.{2 * i}.bias"].clone()
            layers += [conv, torch.nn.ReLU()]
        cond1 = torch.nn.Sequential(*layers[:-1])

        def lin(part):
            w = sd[f"{name}.{part}.0.weight"]
            m = torch.nn.Linear(w.shape[1], w.shape[0])
            m.weight.data, m.bias.data = w.clone(), sd[f"{name}.{part}.0.bias"].clone()
            return m
        down, mid, up = torch.nn.Sequential(lin("down"), torch.nn.ReLU()), \
            torch.nn.Sequential(lin("mid"), torch.nn.ReLU()), lin("up")
        cx = cond1(hint)
        n, c, h, w = cx.shape
        cx = cx.view(n, c, h * w).permute(0, 2, 1).repeat(count, 1, 1)

        def hook(_m, args, cx=cx, down=down, mid=mid, up=up):
            x = args[0]
            return (x + up(mid(torch.cat([cx, down(x)], dim=2))) * multiplier,)
        handles.append(mods[path].register_forward_pre_hook(hook, prepend=True))
    return handles


@pytest.fixture(scope="module")
def hint():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _hint_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)[None]


def _unet_inputs(unet, batch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, unet.config["cross_attention_dim"], generator=g)
    proj = unet.add_embedding.linear_1.in_features - 6 * unet.config["addition_time_embed_dim"]
    added = {"text_embeds": torch.randn(batch, proj, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return x, torch.tensor(500), ctx, added


@torch.no_grad()
def test_matches_reference_one_unet_call(sdxl, hint):
    unet = sdxl.unet
    sds = [_state_dict(unet, 0), _state_dict(unet, 1)]
    hints = [hint, hint.rotate(90)]
    x, t, ctx, added = _unet_inputs(unet, 2)  # CFG: 2 branches of one image
    plain = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    # reference: two LLLites chained as upstream's apply_to (the later one sees the plain input)
    handles = []
    for sd, h, mul in zip(sds, hints, (1.0, 0.7)):
        handles += _reference_hooks(unet, sd, _hint_tensor(h), mul, 2)
    try:
        expected = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    finally:
        for h in handles:
            h.remove()
    nets = [ControlNetLLLite(LLLiteOption("a", multiplier=1.0), unet, sds[0]),
            ControlNetLLLite(LLLiteOption("b", multiplier=0.7), unet, sds[1])]
    try:
        batch = LLLiteBatch(nets, [tuple(hints)])
        assert batch.residuals(0, 1, x, t, ctx, 2) == {}
        ours = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        batch.close()
        after = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    finally:
        for n in nets:
            n.remove()
    assert (expected - plain).abs().max() > 1e-3  # the reference does change the output
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, plain)  # closed: hooks inactive


def _pipe(models, nets):
    return Pipeline(models, "cpu", progress=False, lllites=nets)


def test_multiplier_zero_and_ratio(sdxl, hint):
    unet = sdxl.unet
    sd = _state_dict(unet)
    specs = [ImageSpec(PROMPT, NEG, seed=5, control_images=(hint,))]
    settings = GenSettings(64, 64, steps=4, scale=7.5)
    plain = _pipe(sdxl, []).generate_latents(specs, settings)
    results = {}
    for key, option in (("zero", LLLiteOption("z", multiplier=0.0)), ("half", LLLiteOption("h", ratio=0.5)),
                        ("full", LLLiteOption("f"))):
        net = ControlNetLLLite(option, unet, sd)
        name = next(iter(net.modules))
        calls = []
        original = net.modules[name].delta
        net.modules[name].delta = lambda x, c, f=original: (calls.append(1), f(x, c))[1]
        try:
            results[key] = (_pipe(sdxl, [net]).generate_latents(specs, settings), len(calls))
        finally:
            net.remove()
    assert torch.equal(results["zero"][0], plain) and results["zero"][1] == 0
    assert results["half"][1] == 3  # upstream: used while step/steps <= ratio -> steps 0, 1, 2 of 4
    assert results["full"][1] == 4
    assert not torch.allclose(results["half"][0], results["full"][0])
    assert not torch.allclose(results["half"][0], plain)
    assert torch.equal(_pipe(sdxl, []).generate_latents(specs, settings), plain)  # hooks removed


@pytest.fixture(scope="module")
def lllite_file(sdxl, tmp_path_factory):
    path = tmp_path_factory.mktemp("lllite") / "lllite.safetensors"
    save_file(_state_dict(sdxl.unet), str(path))
    return str(path)


def test_gen_img_end_to_end(tiny_diffusers, lllite_file, hint, tmp_path):
    hint.save(tmp_path / "hint.png")
    base = ["--ckpt", tiny_diffusers["sdxl"], "--W", "64", "--H", "64", "--steps", "3", "--seed", "7",
            "--prompt", "a cat"]
    with_l = gen_img.main(base + ["--outdir", str(tmp_path / "a"), "--control_net_lllite_models", lllite_file,
                                  "--control_net_multipliers", "1.0", "--control_net_ratios", "1",
                                  "--guide_image_path", str(tmp_path / "hint.png")])
    without = gen_img.main(base + ["--outdir", str(tmp_path / "b")])
    zero = gen_img.main(base + ["--outdir", str(tmp_path / "c"), "--control_net_lllite_models", lllite_file,
                                "--control_net_multipliers", "0", "--guide_image_path", str(tmp_path / "hint.png")])
    a, b, z = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (with_l, without, zero))
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() > 0
    assert np.array_equal(z, b)


def test_errors(tiny_diffusers, sdxl, lllite_file, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "g.png")
    rest = ["--prompt", "x", "--outdir", str(tmp_path / "o"), "--W", "64", "--H", "64", "--steps", "1"]
    lite = ["--control_net_lllite_models", lllite_file, "--guide_image_path", str(tmp_path / "g.png")]
    sdxl_args = ["--ckpt", tiny_diffusers["sdxl"], *rest]
    capsys.readouterr()
    msg = _exit_line(capsys, ["--ckpt", tiny_diffusers["sd1"], *rest, *lite], before_loading=False)
    assert "SDXL models only" in msg
    msg = _exit_line(capsys, sdxl_args + lite + ["--control_net_multipliers", "1", "0.5"])
    assert "--control_net_multipliers has 2 value(s)" in msg
    msg = _exit_line(capsys, sdxl_args + lite + ["--control_net_ratios", "1", "0.5"])
    assert "--control_net_ratios has 2 value(s)" in msg
    msg = _exit_line(capsys, sdxl_args + ["--control_net_lllite_models", lllite_file])
    assert "--guide_image_path" in msg
    msg = _exit_line(capsys, sdxl_args + lite + ["--control_net_models", lllite_file])
    assert "cannot be used together" in msg
    # a file missing the first module
    sd = _state_dict(sdxl.unet)
    first = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith(first + ".")}, str(path))
    msg = _exit_line(capsys, sdxl_args + ["--control_net_lllite_models", str(path), "--guide_image_path",
                                          str(tmp_path / "g.png")], before_loading=False)
    assert f"module {first} is missing" in msg
    # a file with a module the U-Net does not have (output blocks are never targeted)
    extra = dict(sd, **{"lllite_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q.down.0.weight":
                        torch.zeros(MLP, 64)})
    save_file(extra, str(path))
    msg = _exit_line(capsys, sdxl_args + ["--control_net_lllite_models", str(path), "--guide_image_path",
                                          str(tmp_path / "g.png")], before_loading=False)
    assert "lllite_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q is not in this U-Net" in msg
    msg = _exit_line(capsys, sdxl_args + lite + ["--ds_depth_1", "1"], before_loading=False)
    assert "Deep Shrink" in msg
