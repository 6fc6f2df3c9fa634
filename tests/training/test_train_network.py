"""train_network.py end to end on tiny SD1 / SD2-v models (issue: training engine §4, §5, §8)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from tests.training.train_helpers import base_args, free_port, make_shapes_folder

ROOT = Path(__file__).resolve().parents[2]


def _tensors(path):
    return load_file(str(path))


def test_trains_and_saves_with_metadata(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 4, "--save_every_n_steps", "2",
                                 "--training_comment", "hello"))
    assert sorted(os.listdir(out)) == ["lora-step00000002.run.json", "lora-step00000002.safetensors",
                                       "lora-step00000004.run.json", "lora-step00000004.safetensors",
                                       "lora.run.json", "lora.safetensors"]  # a receipt beside each model
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "4" and meta["ss_seed"] == "7"
    assert meta["ss_training_comment"] == "hello" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks shape": {"n_repeats": 2, "img_count": 3}}
    assert "sshs_model_hash" in meta and "sshs_legacy_hash" in meta
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in") for k in keys)
    # the LoRA moved away from its zero-initialised up weights
    up = [v for k, v in _tensors(out / "lora.safetensors").items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in up)


def test_resume_continues_bit_identically(tiny_sd, shapes_data, tmp_path):
    """6 straight steps == 3 steps + save_state + resume + 3 steps (weights, tensor for tensor)."""
    common = ["--save_every_n_steps", "3", "--save_state", "--network_dropout", "0.1"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, straight, 6, *common))
    state = straight / "lora-step00000003-state"
    assert (state / "train_state.json").exists()
    # a state holds only what trains: the network (lora_* keys), never the frozen U-Net / text encoder
    assert all(k.startswith("lora_") for k in _tensors(state / "model.safetensors"))
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, resumed, 6, *common,
                                 "--resume", str(state)))
    a, b = _tensors(straight / "lora.safetensors"), _tensors(resumed / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_lowers_the_loss_seen_by_diffusers(tiny_sd, tmp_path):
    """Overfit one image; diffusers' own LoRA loader sees a lower denoising loss on it than the base."""
    from diffusers import StableDiffusionPipeline

    data = make_shapes_folder(tmp_path / "data", repeats=1, n=1)
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], data, out, 40, "--learning_rate", "1e-2",
                                 "--network_train_unet_only", "--max_grad_norm", "0"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd["sd1"]["diffusers"]))
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(next((data / "1_sks shape").glob("*.png")))).astype(np.float32) / 127.5 - 1
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    ids = pipe.tokenizer(["a sks shape, number 0"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([100, 300, 500, 700, 900])
    noise = torch.randn(5, 4, 8, 8, generator=g)

    @torch.no_grad()
    def loss():
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        noisy = pipe.scheduler.add_noise(lat.repeat(5, 1, 1, 1), noise, t) if hasattr(pipe.scheduler, "add_noise") else None
        ctx = pipe.text_encoder(ids)[0].repeat(5, 1, 1)
        return torch.nn.functional.mse_loss(pipe.unet(noisy, t, ctx).sample, noise).item()

    from diffusers import DDPMScheduler

    pipe.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    before = loss()
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    after = loss()
    assert after < 0.9 * before, (before, after)


def test_sd2_v_parameterization_trains(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd2"]["safetensors"], shapes_data, out, 2, "--v2", "--v_parameterization"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.prediction_type"] == "v"


def test_config_file_with_accelerate_launch(tiny_sd, shapes_data, tmp_path):
    """`accelerate launch train_network.py --config_file x.toml`, as users run it."""
    out = tmp_path / "out"
    args = base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2)
    toml_lines = []
    it = iter(args)
    for a in it:
        key = a[2:]
        if key == "console_log_simple":
            toml_lines.append(f"{key} = true")
            continue
        v = next(it)
        toml_lines.append(f"{key} = {v}" if v.replace('.', '').replace('-', '').replace('e', '').isdigit() else f"{key} = {json.dumps(v)}")
    cfg = tmp_path / "x.toml"
    cfg.write_text("[train]\n" + "\n".join(toml_lines) + "\n", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_network.py"),
                        "--config_file", str(cfg)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "lora.safetensors").exists()


@pytest.mark.parametrize("bad,msg", [
    (["--optimizer_type", "NoSuchOpt"], "NoSuchOpt"),
    (["--adaptive_noise_scale", "0.1"], "--noise_offset"),
    (["--lr_warmup_steps", "5"], "constant_with_warmup"),
])
def test_bad_options_exit_2(tiny_sd, shapes_data, tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit) as e:
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1, *bad))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o" / "lora.safetensors").exists()


def test_two_processes_on_cpu(tiny_sd, shapes_data, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=1 trains over gloo."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no",
                        str(ROOT / "train_network.py"), *base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 batches per epoch" in r.stderr  # 6 batches split over 2 processes
    assert (out / "lora.safetensors").exists()
