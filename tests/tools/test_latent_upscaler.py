"""tools/latent_upscaler.py: upstream's weight files load, gen_img's hires fix uses the model, bad files are one line.
Oracles: the key list and shapes written out from upstream's module definition (v0.8.7 tools/latent_upscaler.py),
its forward written out with torch.nn.functional, and its upscale steps (LANCZOS, /127.5 - 1, VAE, x scaling)."""
from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import gen_img
from tools import latent_upscaler
from tools.make_tiny_model import write_tiny_model

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, channels: int) -> dict[str, tuple]:
    return {f"{prefix}.{p}": (() if p == "num_batches_tracked" else (channels,)) for p in BN}


def upstream_shapes() -> dict[str, tuple]:
    """Upstream's Upscaler: conv1 4->128 3x3 + bn1; resblock1..20 (conv1, bn1, conv2, bn2 at 128); conv2 128->64
    + bn2; conv3 64->64 + bn3; conv_final 64->4 1x1 with bias. Convs other than conv_final have no bias."""
    shapes = {"conv1.weight": (128, 4, 3, 3), **_bn("bn1", 128)}
    for i in range(1, 21):
        for j in (1, 2):
            shapes[f"resblock{i}.conv{j}.weight"] = (128, 128, 3, 3)
            shapes.update(_bn(f"resblock{i}.bn{j}", 128))
    shapes.update({"conv2.weight": (64, 128, 3, 3), **_bn("bn2", 64), "conv3.weight": (64, 64, 3, 3),
                   **_bn("bn3", 64), "conv_final.weight": (4, 64, 1, 1), "conv_final.bias": (4,)})
    return shapes


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with upstream's names: small convs (the 20 blocks stay bounded), BatchNorm statistics not 0/1."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in upstream_shapes().items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(7, dtype=torch.int64)
        elif name.endswith("running_var"):
            sd[name] = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith(".weight") and len(shape) == 4:
            sd[name] = torch.randn(shape, generator=gen) * (0.3 / (shape[1] * shape[2] * shape[3]) ** 0.5)
        else:
            sd[name] = 0.1 * torch.randn(shape, generator=gen) + (1.0 if name.endswith("bn1.weight") else 0.0)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Upstream's Upscaler.forward in eval mode, written out."""
    def conv(name, h, pad=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd.get(f"{name}.bias"), padding=pad)

    def bn(name, h):
        return F.batch_norm(h, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)

    inp, h = x, F.relu(bn("bn1", conv("conv1", x)))
    for group in range(5):
        residual = h
        for i in range(group * 4 + 1, group * 4 + 5):
            r = f"resblock{i}"
            h = F.relu(bn(f"{r}.bn2", conv(f"{r}.conv2", F.relu(bn(f"{r}.bn1", conv(f"{r}.conv1", h))))) + h)
        h = h + residual
    h = bn("bn3", conv("conv3", F.relu(bn("bn2", conv("conv2", h)))))
    return conv("conv_final", h, pad=0) + inp


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_upstream_weights_load_and_forward(tmp_path, ext):
    sd = random_weights()
    path = tmp_path / f"w{ext}"
    save_file(sd, str(path)) if ext == ".safetensors" else torch.save(sd, path)
    model = latent_upscaler.create_upscaler(weights=str(path))
    got = model.state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == upstream_shapes()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert not model.training and model.support_latents() is False
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, x), atol=1e-5, rtol=1e-5)


def test_num_batches_tracked_optional(tmp_path):
    """Files without BatchNorm's counter (never used in eval mode) load too."""
    sd = {k: v for k, v in random_weights().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(tmp_path / "w.safetensors"))
    latent_upscaler.create_upscaler(weights=str(tmp_path / "w.safetensors"))


def _pixels(images, width, height):
    a = np.stack([np.asarray(im.resize((width, height), Image.LANCZOS)) for im in images]).astype(np.float32)
    return torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1.0


HAND_PLUGIN = """
import torch
from safetensors.torch import load_file
from tests.tools.test_latent_upscaler import _pixels, reference_forward


class ByHand:
    def __init__(self, weights):
        self.sd = load_file(weights)

    def to(self, *args):
        return self

    def support_latents(self):
        return False

    def upscale(self, vae, images, latents, dtype, width, height, batch_size=1, vae_batch_size=1):
        with torch.no_grad():
            z = vae.encode(_pixels(images, width, height)).latent_dist.mean
            return reference_forward(self.sd, z) * 0.18215


def create_upscaler(weights):
    return ByHand(weights)
"""


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory) -> str:
    return str(write_tiny_model("sd1", tmp_path_factory.mktemp("ups"), formats=("diffusers",))["diffusers"])


def _gen(folder, out, *extra):
    paths = gen_img.main(["--ckpt", folder, "--outdir", str(out), "--prompt", "a cat", "--W", "128", "--H", "128",
                          "--steps", "2", "--highres_fix_steps", "2", "--seed", "5", "--highres_fix_scale", "0.5",
                          "--images_per_prompt", "2", "--sequential_file_name", *extra])
    return np.stack([np.asarray(Image.open(p)).astype(np.int16) for p in paths])


def test_gen_img_hires_fix_uses_the_model(sd1_folder, tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    save_file(random_weights(), str(weights))
    (tmp_path / "hand_ups.py").write_text(textwrap.dedent(HAND_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--highres_fix_upscaler_args", f"weights={weights}"]
    ours = _gen(sd1_folder, tmp_path / "ours", "--highres_fix_upscaler", "tools.latent_upscaler", *args)
    hand = _gen(sd1_folder, tmp_path / "hand", "--highres_fix_upscaler", "hand_ups", *args)
    plain = _gen(sd1_folder, tmp_path / "plain")
    assert np.abs(ours - hand).max() <= 1  # float rounding of the two forward passes at most
    assert np.abs(ours - plain).max() > 10


def _exit_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: "), err
    # refused before any model was loaded: the only other lines are the upscaler's own log
    assert all("upscaler" in line for line in err[:-1]), err
    return err[-1]


def _bad_files(tmp_path) -> dict[str, str]:
    sd = random_weights()
    save_file({k: v for k, v in sd.items() if k != "resblock7.conv2.weight"}, str(tmp_path / "missing.safetensors"))
    save_file({**sd, "conv_final.weight": torch.zeros(3, 64, 1, 1)}, str(tmp_path / "shape.safetensors"))
    save_file({**sd, "extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage")
    return {"missing": "missing.safetensors", "shape": "shape.safetensors", "extra": "extra.safetensors",
            "garbage": "garbage.safetensors", "absent": "nope.safetensors"}


@pytest.mark.parametrize("case, words", [
    ("absent", ["nope.safetensors", "no such file"]),
    ("garbage", ["garbage.safetensors", "not a readable safetensors"]),
    ("missing", ["weights=", "missing.safetensors", "1 missing", "resblock7.conv2.weight"]),
    ("shape", ["shape.safetensors", "conv_final.weight (3, 64, 1, 1) (expected (4, 64, 1, 1))"]),
    ("extra", ["extra.safetensors", "1 unexpected", "extra.weight"]),
    ("nokey", ["--highres_fix_upscaler_args", "weights=<file> is required"]),
    ("other", ["--highres_fix_upscaler_args", "scale=", "only weights=<file>"]),
])
def test_bad_weights_one_line_exit_2(sd1_folder, tmp_path, capsys, case, words):
    files = _bad_files(tmp_path)
    ups_args = {"nokey": "", "other": f"weights={tmp_path / files['missing']};scale=2"}.get(
        case, f"weights={tmp_path / files.get(case, '')}")
    argv = ["--ckpt", sd1_folder, "--outdir", str(tmp_path / "o"), "--prompt", "x", "--W", "64", "--H", "64",
            "--steps", "1", "--highres_fix_scale", "0.5", "--highres_fix_upscaler", "tools.latent_upscaler",
            "--highres_fix_upscaler_args", ups_args]
    line = _exit_line(capsys, argv)
    assert all(w in line for w in words), line
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")


def test_command_line_upscales_twice_the_size(sd1_folder, tmp_path):
    """The stand-alone tool: each image at twice its (multiple-of-8) size, as the model and the VAE make it."""
    from library.models.loading import load_vae

    weights = tmp_path / "w.safetensors"
    sd = random_weights()
    save_file(sd, str(weights))
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (36, 42, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src / "b.png")
    out = latent_upscaler.main(["--vae_path", sd1_folder, "--weights", str(weights), "--image_pattern",
                                str(src / "*.png"), "--output_dir", str(tmp_path / "out"), "--debug"])
    assert sorted(os.path.basename(p) for p in out) == ["a_upscaled.png", "b_upscaled.png"]
    assert sorted(os.listdir(tmp_path / "out")) == ["a_lanczos4.png", "a_upscaled.png", "b_lanczos4.png",
                                                    "b_upscaled.png"]
    vae = load_vae(sd1_folder, "sd1")
    a = Image.open(src / "a.png").convert("RGB").crop((0, 0, 40, 32))
    with torch.no_grad():
        z = reference_forward(sd, vae.encode(_pixels([a], 80, 64)).latent_dist.mean)
        x = vae.decode(z).sample[0].permute(1, 2, 0)
    want = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy().astype(np.int16)
    got = np.asarray(Image.open(tmp_path / "out" / "a_upscaled.png")).astype(np.int16)
    assert got.shape == (64, 80, 3) and np.abs(got - want).max() <= 1
