"""Tiny-VAE training: a few steps lower the loss, the latent-scale fold is exact, the folder loads."""
import json

import pytest
import torch

from library.shapes import vae_training as vt
from tools import train_tiny_vae


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: tiny convolutions gain nothing from more, and on a busy CI box OpenMP spin-waits."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cfg(**kw):
    base = dict(steps=12, batch_size=4, crop=16, dataset_size=24, warmup=2, lr=2e-3,
                block_out_channels=(32, 32, 32, 32), norm_num_groups=8)
    return vt.VAETrainConfig(**{**base, **kw})


def test_a_few_steps_lower_the_loss():
    vae, history = vt.train_vae(_cfg(steps=16))
    assert len(history) == 16
    assert sum(history[-4:]) / 4 < sum(history[:4]) / 4


def test_fold_latent_scale_keeps_reconstructions_and_normalises_latents():
    torch.manual_seed(0)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vt.vae_config(_cfg())).eval()
    buckets = vt.make_buckets(12, 0, ("red", "blue"), ("circle", "star"))
    x = buckets[0][:3]
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mode()).sample
    mean, std = vt.latent_stats(vae, buckets)
    vt.fold_latent_scale(vae, mean, std)
    with torch.no_grad():
        after = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert torch.allclose(before, after, atol=1e-4)
    mean2, std2 = vt.latent_stats(vae, buckets)
    assert torch.allclose(mean2 * vt.SD1_SCALING, torch.zeros(4), atol=1e-3)
    assert torch.allclose(std2 * vt.SD1_SCALING, torch.ones(4), atol=1e-3)


def test_cli_saves_a_folder_diffusers_loads(tmp_path, capsys):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    report = train_tiny_vae.main(["--out", str(out), "--steps", "3", "--batch_size", "2", "--crop", "16",
                                  "--dataset_size", "12", "--eval_n", "6"])
    vae = AutoencoderKL.from_pretrained(str(out))
    assert list(vae.config.block_out_channels) == [32, 32, 32, 32]
    assert vae.config.norm_num_groups == 8 and vae.config.scaling_factor == vt.SD1_SCALING
    saved = json.loads((out / "training_report.json").read_text())
    assert saved["steps_done"] == 3 and 0 <= saved["color_accuracy"] <= 1 and report["n"] == 6
    assert "--steps 3" in saved["command"]
    assert "PSNR" in capsys.readouterr().out


def test_cli_rejects_bad_channels(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_tiny_vae.main(["--out", str(tmp_path / "v"), "--channels", "12,32,32,32"])
    assert e.value.code == 2 and "multiple of --norm_groups" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_demo_model_builder_writes_a_loadable_sd1_file_with_its_norm_groups(tmp_path):
    """tools/build_demo_model.py: trained VAE folder + fresh tiny U-Net -> LDM file our loader reads back."""
    from diffusers import AutoencoderKL

    from library.models.loading import load_models
    from tools import build_demo_model

    vae_dir = tmp_path / "vae"
    AutoencoderKL(**vt.vae_config(_cfg())).save_pretrained(str(vae_dir))
    out = tmp_path / "demo.safetensors"
    build_demo_model.main(["--vae", str(vae_dir), "--out", str(out), "--unet_channels", "16,32"])
    models = load_models(str(out))
    assert models.unet.config.norm_num_groups == 8 and models.vae.config.norm_num_groups == 8
    assert list(models.unet.config.block_out_channels) == [16, 32]
    assert models.unet.config.cross_attention_dim == models.text_encoders[0].config.hidden_size
    # --text_mixing none (default): a word's output vector does not depend on the other words
    import torch

    te, tok = models.text_encoders[0], models.tokenizers[0]
    ids = tok(["a red circle", "a blue circle", "a red star"], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    with torch.no_grad():
        h = te(ids).last_hidden_state
    assert torch.equal(h[0, 3], h[1, 3]) and torch.equal(h[0, 2], h[2, 2])  # circle / red, each alone
    assert not torch.allclose(h[0, 3], h[2, 3])  # different words still differ
    assert torch.equal(h[0, 5:], h[1, 5:])  # padding no longer summarises the prompt


def test_demo_model_builder_random_text_mixing_mixes(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from library.models.loading import load_models
    from tools import build_demo_model

    vae_dir = tmp_path / "vae"
    AutoencoderKL(**vt.vae_config(_cfg())).save_pretrained(str(vae_dir))
    out = tmp_path / "demo.safetensors"
    build_demo_model.main(["--vae", str(vae_dir), "--out", str(out), "--unet_channels", "16,32",
                           "--text_mixing", "random"])
    models = load_models(str(out))
    ids = models.tokenizers[0](["a red circle", "a blue circle"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        h = models.text_encoders[0](ids).last_hidden_state
    assert not torch.allclose(h[0, 3], h[1, 3])  # causal attention: circle's vector depends on the colour
