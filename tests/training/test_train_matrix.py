"""Shared options behave in train_network.py: a matrix of short real runs (issue: other trainers §5).

Each cell trains 2 steps on the tiny SD1 model, logs to tensorboard, and checks: finite logged losses,
a LoRA file that loads, and the option's visible effect where it has one.
"""
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from tests.training.train_helpers import base_args


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in logdir.rglob("events.out.tfevents.*")]
    assert runs, "no tensorboard events written"
    ea = EventAccumulator(str(runs[0].parent))
    ea.Reload()
    return {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


CELLS = {
    "huber_snr": ["--loss_type", "huber"],
    "smooth_l1_exp": ["--loss_type", "smooth_l1", "--huber_schedule", "exponential"],
    "min_snr_debiased": ["--min_snr_gamma", "5", "--debiased_estimation_loss"],
    "noise_tricks": ["--noise_offset", "0.1", "--adaptive_noise_scale", "0.01", "--multires_noise_iterations", "3",
                     "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength", "--noise_offset_random_strength"],
    "timesteps_ztsnr": ["--min_timestep", "100", "--max_timestep", "900", "--zero_terminal_snr"],
    "lion_cosine": ["--optimizer_type", "Lion", "--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "1"],
    "prodigy": ["--optimizer_type", "Prodigy", "--learning_rate", "1.0"],
    "adafactor": ["--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=True", "scale_parameter=True",
                  "warmup_init=True", "--lr_scheduler", "adafactor"],
    "sgd_polynomial": ["--optimizer_type", "SGDNesterov", "--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"],
    "bf16_grad_ckpt": ["--mixed_precision", "bf16", "--gradient_checkpointing"],
    "full_bf16": ["--mixed_precision", "bf16", "--full_bf16"],
    "accumulate_clip": ["--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5"],
    "latents_cached": ["--cache_latents", "--vae_batch_size", "2"],
    "caption_tricks": ["--shuffle_caption", "--caption_dropout_rate", "0.5", "--keep_tokens", "1",
                       "--caption_tag_dropout_rate", "0.2", "--token_warmup_step", "1"],
    "long_captions": ["--max_token_length", "225", "--clip_skip", "2"],
    "c3lier_dropouts": ["--network_args", "conv_dim=4", "conv_alpha=1", "rank_dropout=0.1", "module_dropout=0.1",
                        "--network_dropout", "0.1", "--scale_weight_norms", "1.0"],
    "block_lr": ["--network_args", "down_lr_weight=sine", "mid_lr_weight=1.5", "up_lr_weight=cosine+.5"],
}


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cell(tiny_sd, shapes_data, tmp_path, cell):
    out, logs = tmp_path / "out", tmp_path / "logs"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2, "--logging_dir", str(logs),
                                 "--log_prefix", "run", *CELLS[cell]))
    scalars = _scalars(logs)
    losses = scalars["loss/current"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    assert "loss/average" in scalars and any(k.startswith("lr/") for k in scalars)
    sd = load_file(str(out / "lora.safetensors"))
    assert sd and all(torch.isfinite(v).all() for v in sd.values())
    if cell == "c3lier_dropouts":
        assert any("resnets_0_conv1" in k for k in sd)  # 3x3 convs adapted
        assert "max_norm/keys_scaled" in scalars
    if cell == "block_lr":
        assert any(k.startswith("lr/group") for k in scalars)
    if cell == "prodigy":
        assert "lr/d*lr" in scalars


def test_save_formats_precision_and_pruning(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 6, "--save_every_n_steps", "2",
                                 "--save_last_n_steps", "2", "--save_precision", "fp16"))
    names = sorted(p.name for p in out.iterdir() if not p.name.endswith(".run.json"))  # receipts: beyond-sd-scripts
    # keep step files newer than 2 steps: 4 and 6 stay, 2 is pruned (spec file-formats §e)
    assert names == ["lora-step00000004.safetensors", "lora-step00000006.safetensors", "lora.safetensors"]
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # alpha included
    out2 = tmp_path / "ckpt"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out2, 1, "--save_model_as", "ckpt"))
    sd = torch.load(out2 / "lora.ckpt", weights_only=True)
    assert any(k.endswith("lora_up.weight") for k in sd)


def test_continue_from_weights_and_dim_from_weights(tiny_sd, shapes_data, tmp_path):
    first = tmp_path / "first"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, first, 2, "--network_dim", "3"))
    w = str(first / "lora.safetensors")
    second = tmp_path / "second"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, second, 1, "--network_weights", w,
                                 "--dim_from_weights", "--learning_rate", "0"))
    a, b = load_file(w), load_file(str(second / "lora.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the loaded weights come back unchanged


def test_max_train_epochs_sets_steps(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 100, "--max_train_epochs", "2",
                                 "--save_every_n_epochs", "1"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    # 3 images x 2 repeats, batch 1 -> 6 steps per epoch
    assert meta["ss_steps"] == "12" and meta["ss_epoch"] == "2" and meta["ss_num_epochs"] == "2"
    assert (out / "lora-000001.safetensors").exists() and not (out / "lora-000002.safetensors").exists()


def test_partial_accumulation_group_steps_at_epoch_end(tiny_sd, tmp_path):
    """3 batches per epoch, accumulation 2: each epoch makes 2 optimizer steps (the last one partial)."""
    from tests.training.train_helpers import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", repeats=1, n=3)
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], data, out, 100, "--max_train_epochs", "2",
                                 "--gradient_accumulation_steps", "2"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_max_train_steps"] == "4" and meta["ss_steps"] == "4" and meta["ss_epoch"] == "2"


def test_fp8_base_trains(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2, "--mixed_precision", "bf16",
                                 "--fp8_base"))
    sd = load_file(str(out / "lora.safetensors"))
    assert sd and all(torch.isfinite(v).all() for v in sd.values())


def test_fp8_base_with_gradient_checkpointing_and_samples(tiny_sd, shapes_data, tmp_path):
    """fp8 storage must survive checkpointing's recomputation (the recomputed layer sees the tensors the first
    pass saw) and sample images during training (the U-Net computes in bf16, not in its fp8 storage)."""
    from library.training.memory.fp8_storage import FP8

    prompts = tmp_path / "p.txt"
    prompts.write_text("a shape --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2, "--mixed_precision", "bf16",
                                 "--fp8_base", "--gradient_checkpointing", "--sample_prompts", str(prompts),
                                 "--sample_every_n_steps", "2"))
    sd = load_file(str(out / "lora.safetensors"))
    assert sd and all(torch.isfinite(v).all() for v in sd.values())
    assert list((out / "sample").glob("*.png"))


def test_fp8_storage_computes_like_the_upcast_weights():
    """Oracle: the same layer with its weight rounded to fp8 and back, in bf16."""
    from library.training.memory.fp8_storage import FP8, store_in_fp8

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 5))
    ref = [m.weight.detach().to(FP8).to(torch.bfloat16) for m in (model[0], model[3])]
    biases = [m.bias.detach().to(torch.bfloat16) for m in (model[0], model[3])]
    x = torch.randn(2, 4, 4, 4).to(torch.bfloat16)
    expected = torch.nn.functional.conv2d(x, ref[0], biases[0], padding=1)
    expected = torch.nn.functional.group_norm(expected, 2, model[1].weight.to(torch.bfloat16),
                                              model[1].bias.to(torch.bfloat16))
    expected = torch.nn.functional.linear(expected.flatten(1), ref[1], biases[1])
    assert store_in_fp8(model, torch.bfloat16) == 2
    assert model[0].weight.dtype == FP8 and model[3].weight.dtype == FP8 and model[1].weight.dtype == torch.bfloat16
    assert torch.equal(model(x), expected)
