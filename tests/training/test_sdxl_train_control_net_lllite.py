"""sdxl_train_control_net_lllite.py (issue 20 item 4). Oracles: key names and shapes written out from sd-scripts
v0.8.7's ``networks/control_net_lllite_for_train.py`` (``apply_lllite`` defaults, ``add_lllite_modules``,
``save_lllite_weights``), gen_img's LLLite loader (``library/sampling/controlnet_lllite.py``), measured effects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import gen_img
import sdxl_train_control_net_lllite
from library.models.loading import load_models
from library.sampling.controlnet_lllite import LLLiteOption, load_lllite
from library.training.methods.lllite_network import LLLiteNetwork
from library.training.objective.conditioning import text_conditioning
from tests.training.controlnet_helpers import hint_prompts, make_pairs, samples_differ
from tests.training.full_train_helpers import common_args, doc_example, weights

COND, DIM = 8, 16


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    from tools.make_tiny_model import write_tiny_model

    return write_tiny_model("sdxl", tmp_path_factory.mktemp("xl"))


@pytest.fixture
def pairs(tmp_path):
    return make_pairs(tmp_path / "data")


def _args(model, pairs, out, steps, *extra):
    images, cond = pairs
    return common_args(model, out, steps, "--train_data_dir", str(images), "--conditioning_data_dir", str(cond),
                       "--output_name", "ll", "--learning_rate", "1e-3", "--cond_emb_dim", str(COND),
                       "--network_dim", str(DIM), *extra)


def _upstream_shapes(unet_config) -> dict[str, tuple]:
    """Keys and shapes upstream's SdxlUNet2DConditionModelControlNetLLLite.apply_lllite(COND, DIM) saves for this
    U-Net: Transformer2DModel children of input_blocks / middle_block (output blocks skipped), attn1 to_q/k/v and
    attn2 to_q only; depth from the LDM block index (input_blocks <=2: 1, <=5: 2, else 3; middle_block: 3);
    conditioning1 = conv(3, c/2, 4, 4) then depth 1: conv(c/2, c, 2, 2); 2: conv(c/2, c, 4, 4);
    3: conv(c/2, c/2, 4, 4), conv(c/2, c, 2, 2) (ReLU between: indices 0, 2, 4); down Linear(in, dim),
    mid Linear(dim + c, dim), up Linear(dim, in); key = lllite_unet_<path with _> + '.' + sub-module key."""
    channels, layers = unet_config["block_out_channels"], unet_config["transformer_layers_per_block"]
    blocks = []  # (LDM block path, depth, transformer blocks, width)
    for level, kind in enumerate(unet_config["down_block_types"]):
        if "CrossAttn" not in kind:
            continue
        for j in range(unet_config["layers_per_block"]):
            index = level * (unet_config["layers_per_block"] + 1) + j + 1
            depth = 1 if index <= 2 else (2 if index <= 5 else 3)
            blocks.append((f"input_blocks_{index}_1", depth, layers[level], channels[level]))
    blocks.append(("middle_block_1", 3, layers[-1], channels[-1]))
    half = COND // 2
    convs = {1: [(half, 3, 4, 4), (COND, half, 2, 2)], 2: [(half, 3, 4, 4), (COND, half, 4, 4)],
             3: [(half, 3, 4, 4), (half, half, 4, 4), (COND, half, 2, 2)]}
    out = {}
    for block, depth, n_tf, width in blocks:
        for t in range(n_tf):
            for layer in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q"):
                name = f"lllite_unet_{block}_transformer_blocks_{t}_{layer}"
                for i, shape in enumerate(convs[depth]):
                    out[f"{name}.conditioning1.{2 * i}.weight"] = shape
                    out[f"{name}.conditioning1.{2 * i}.bias"] = shape[:1]
                for part, shape in (("down", (DIM, width)), ("mid", (DIM, DIM + COND)), ("up", (width, DIM))):
                    out[f"{name}.{part}.0.weight"] = shape
                    out[f"{name}.{part}.0.bias"] = shape[:1]
    return out


@pytest.fixture
def trained(tiny_xl, pairs, tmp_path):
    out = tmp_path / "out"
    sdxl_train_control_net_lllite.main(_args(tiny_xl["safetensors"], pairs, out, 2, "--learning_rate", "1e-2"))
    return out / "ll.safetensors"


def test_file_has_upstreams_keys_shapes_and_modelspec(trained, tiny_xl):
    unet = load_models(str(tiny_xl["safetensors"])).unet
    expected = _upstream_shapes(unet.config)
    sd = load_file(str(trained))
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(sd[k].abs().max() > 0 for k in sd if k.endswith(".up.0.weight"))  # trained away from zero
    with safe_open(str(trained), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"


def test_gen_img_path_gives_the_training_networks_outputs(trained, tiny_xl, tmp_path):
    """gen_img's loader on the saved file and the training network with those weights: the same U-Net output."""
    models = load_models(str(tiny_xl["safetensors"]))
    unet = models.unet.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    ctx, pooled = torch.randn(2, 77, 96, generator=g), torch.randn(2, 64, generator=g)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    hint = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        plain = unet(x, t, ctx, added_cond_kwargs=added).sample
        net = LLLiteNetwork(unet, COND, DIM)
        net.load_state_dict(load_file(str(trained)))
        net.eval().cond = net.embed(hint)
        ours = unet(x, t, ctx, added_cond_kwargs=added).sample
        net.remove()
        loaded = load_lllite(LLLiteOption(str(trained)), unet)
        loaded.cond = loaded.embed(hint)
        theirs = unet(x, t, ctx, added_cond_kwargs=added).sample
        loaded.remove()
    assert (ours - plain).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # and gen_img.py itself draws a different image with the LLLite and its hint
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))).save(tmp_path / "h.png")
    base = ["--ckpt", str(tiny_xl["safetensors"]), "--W", "64", "--H", "64", "--steps", "3", "--seed", "7",
            "--prompt", "a square"]
    with_l = gen_img.main(base + ["--outdir", str(tmp_path / "a"), "--control_net_lllite_models", str(trained),
                                  "--guide_image_path", str(tmp_path / "h.png")])
    without = gen_img.main(base + ["--outdir", str(tmp_path / "b")])
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (with_l[0], without[0]))
    assert np.abs(a - b).max() > 0


def test_continue_from_network_weights(trained, tiny_xl, pairs, tmp_path):
    """--network_weights (sizes from the file) with learning rate 0 writes back exactly what it read, as .pt."""
    out = tmp_path / "again"
    images, cond = pairs
    sdxl_train_control_net_lllite.main(common_args(
        tiny_xl["safetensors"], out, 1, "--train_data_dir", str(images), "--conditioning_data_dir", str(cond),
        "--output_name", "ll", "--learning_rate", "0", "--network_weights", str(trained), "--save_model_as", "pt"))
    a, b = load_file(str(trained)), weights(out / "ll.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_samples_with_the_cn_image(tiny_xl, pairs, tmp_path):
    out = tmp_path / "out"
    sdxl_train_control_net_lllite.main(_args(tiny_xl["safetensors"], pairs, out, 2, "--learning_rate", "1e-2",
                *hint_prompts(tmp_path / "p.txt", pairs[1] / "0.png")))
    assert samples_differ(out / "sample")


def _exit_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        sdxl_train_control_net_lllite.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_is_one_line_before_models_load(tiny_xl, tiny_sd, pairs, tmp_path, capsys, monkeypatch):
    from library.training.runners import run_common

    monkeypatch.setattr(run_common, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    model, out = tiny_xl["safetensors"], tmp_path / "out"
    images, cond = pairs
    no_dims = common_args(model, out, 1, "--train_data_dir", str(images), "--conditioning_data_dir", str(cond))
    assert "--cond_emb_dim and --network_dim required" in _exit_line(capsys, no_dims)
    cases = {"--cond_emb_dim must be even": ["--cond_emb_dim", "7"], "--v2": ["--v2"],
             "--network_weights": ["--network_weights", str(tmp_path / "nope.safetensors")],
             "--in_json": ["--in_json", str(tmp_path / "j")], "--weighted_captions": ["--weighted_captions"]}
    for words, extra in cases.items():
        assert words in _exit_line(capsys, _args(model, pairs, out, 1, *extra)), words
    assert "SDXL" in _exit_line(capsys, _args(tiny_sd["sd1"]["safetensors"], pairs, out, 1))
    assert not out.exists()


def test_help_lists_every_v087_option(capsys):
    """sd-scripts v0.8.7's sdxl_train_control_net_lllite.py setup_parser(): train_controlnet's shared groups
    (written out in test_train_controlnet.py) + add_sdxl_training_arguments + its own options."""
    from tests.training.test_train_controlnet import UPSTREAM_OPTIONS as SHARED

    shared = [o for o in SHARED if o not in ("save_model_as", "controlnet_model_name_or_path", "conditioning_data_dir")]
    own = ["cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",  # add_sdxl_training_arguments
           "save_model_as", "cond_emb_dim", "network_weights", "network_dim", "network_dropout",
           "conditioning_data_dir", "no_half_vae"]
    with pytest.raises(SystemExit):
        sdxl_train_control_net_lllite.main(["--help"])
    text = capsys.readouterr().out
    missing = [o for o in shared + own if f"--{o} " not in text and f"--{o}\n" not in text and f"--{o}," not in text]
    assert not missing


def test_docs_config_example_trains(tiny_xl, pairs, tmp_path):
    """The worked example of docs/sdxl_train_control_net_lllite.md, with the tiny model and data swapped in."""
    images, cond = pairs
    swaps = {"pretrained_model_name_or_path": str(tiny_xl["safetensors"]), "train_data_dir": str(images),
             "conditioning_data_dir": str(cond), "caption_extension": ".caption", "output_dir": str(tmp_path / "out"),
             "resolution": "64,64", "max_train_steps": 1, "sample_prompts": None, "sample_every_n_steps": None,
             "mixed_precision": "no", "xformers": None, "optimizer_type": "AdamW", "max_data_loader_n_workers": 0,
             "enable_bucket": None, "cond_emb_dim": COND, "network_dim": DIM}
    doc = Path(__file__).resolve().parents[2] / "docs" / "sdxl_train_control_net_lllite.md"
    config, command = doc_example(doc, swaps, tmp_path / "ll.toml", "# lllite.toml")
    sdxl_train_control_net_lllite.main(["--config_file", str(config)])
    saved = load_file(str(tmp_path / "out" / "my_lllite.safetensors"))
    assert any(k.endswith(".conditioning1.0.weight") for k in saved)
    assert command.split()[:3] == ["accelerate", "launch", "sdxl_train_control_net_lllite.py"]


def _gray_pairs(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """n uniform gray images, each its own hint (the hint is the only clue to the image), one caption for all."""
    images, cond = root / "images", root / "cond"
    images.mkdir(parents=True)
    cond.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.full((64, 64, 3), rng.integers(0, 256), np.uint8)
        Image.fromarray(a).save(images / f"{i}.png")
        Image.fromarray(a).save(cond / f"{i}.png")
        (images / f"{i}.caption").write_text("a square", encoding="utf-8")
    return images, cond


def test_trained_lllite_answers_its_hint(tiny_xl, tmp_path):
    """After 100 steps on 16 gray images whose hint is the image itself, read through gen_img's loader: the U-Net's
    prediction for the same noisy latents moves when the hint goes from black to white (before training it cannot:
    ``up`` starts at zero), and moves the more the further apart the hints are. That the move points towards the
    hinted image was measured and is too small to assert on a random tiny SDXL (docs/sdxl_train_control_net_lllite.md)."""
    images, cond = _gray_pairs(tmp_path / "train", 16, 0)
    out = tmp_path / "out"
    sdxl_train_control_net_lllite.main(common_args(
        tiny_xl["safetensors"], out, 100, "--train_data_dir", str(images), "--conditioning_data_dir", str(cond),
        "--output_name", "ll", "--learning_rate", "3e-3", "--train_batch_size", "4", "--cond_emb_dim", "16",
        "--network_dim", "32", "--optimizer_type", "AdamW", "--seed", "1"))
    models = load_models(str(tiny_xl["safetensors"]))
    unet = models.unet.eval()

    def ids(tok):
        return tok(["a square"] * 2, padding="max_length", max_length=77, truncation=True,
                   return_tensors="pt").input_ids[:, None]

    batch = {"input_ids": ids(models.tokenizers[0]), "input_ids2": ids(models.tokenizers[1]),
             "original_sizes_hw": torch.tensor([[64, 64]] * 2), "crop_top_lefts": torch.tensor([[0, 0]] * 2),
             "target_sizes_hw": torch.tensor([[64, 64]] * 2)}
    with torch.no_grad():
        c = text_conditioning("sdxl", models.text_encoders, batch, clip_skip=None, max_token_length=None,
                              device="cpu", dtype=torch.float32)
        lllite = load_lllite(LLLiteOption(str(out / "ll.safetensors")), unet)
        latent = 64 // 2 ** (len(models.vae.config.block_out_channels) - 1)
        xt = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(0))

        def eps(gray: float) -> torch.Tensor:
            lllite.cond = lllite.embed(torch.full((2, 3, 64, 64), gray))
            return unet(xt, torch.full((2,), 500), c.context, added_cond_kwargs=c.added_cond_kwargs).sample

        black, mid, white = eps(-1.0), eps(0.0), eps(1.0)
    # measured after these 100 steps: |white - black| 5.5 % of |black|, |mid - black| 2.7 % (AMD EPYC)
    assert (white - black).norm() > 0.02 * black.norm(), float((white - black).norm() / black.norm())
    assert (white - black).norm() > (mid - black).norm() > 0
