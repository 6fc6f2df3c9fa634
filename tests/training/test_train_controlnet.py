"""train_controlnet.py (issue 20 item 3). Oracles: diffusers' ``ControlNetModel`` (``from_single_file`` on the LDM
file, ``from_pretrained`` on the Diffusers folder), sd-scripts v0.8.7's ControlNet key map written out below
(``library/model_util.py: controlnet_conversion_map``), gen_img's ControlNet path."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import gen_img
import train_controlnet
from library.models.loading import load_models
from library.sampling.controlnet import load_control_net
from tests.training.controlnet_helpers import hint_prompts, make_pairs, samples_differ
from tests.training.full_train_helpers import common_args, doc_example, weights


@pytest.fixture
def pairs(tmp_path):
    return make_pairs(tmp_path / "data")


def _args(model, pairs, out, steps, *extra):
    images, cond = pairs
    return common_args(model, out, steps, "--train_data_dir", str(images), "--conditioning_data_dir", str(cond),
                       "--output_name", "cn", "--learning_rate", "1e-3", *extra)


def _upstream_ldm_names(diffusers_keys):
    """sd-scripts v0.8.7 ``convert_controlnet_state_dict_to_sd``: its three maps, applied in its order."""
    whole = [("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
             ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
             ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
             ("middle_block_out.0.weight", "controlnet_mid_block.weight"),
             ("middle_block_out.0.bias", "controlnet_mid_block.bias")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
              ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer = []
    for i in range(4):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < 3:
            layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    layer += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    names = ["conv_in"] + [f"blocks.{i}" for i in range(6)] + ["conv_out"]
    layer += [(f"input_hint_block.{i * 2}.", f"controlnet_cond_embedding.{n}.") for i, n in enumerate(names)]
    layer += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.") for i in range(12)]
    mapping = {k: k for k in diffusers_keys}
    for sd_name, hf_name in whole:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in resnet:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in layer:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return mapping


@pytest.fixture
def trained(tiny_sd, pairs, tmp_path):
    """2 steps saved as sd-scripts' LDM file and as a Diffusers folder (the same seed: the same weights)."""
    model = tiny_sd["sd1"]["safetensors"]
    train_controlnet.main(_args(model, pairs, tmp_path / "ldm", 2))
    train_controlnet.main(_args(model, pairs, tmp_path / "hf", 2, "--save_model_as", "diffusers_safetensors"))
    return tmp_path / "ldm" / "cn.safetensors", tmp_path / "hf" / "cn"


def test_ldm_file_has_upstreams_names_and_diffusers_reads_it(trained):
    from diffusers import ControlNetModel

    ldm_path, folder = trained
    ours = load_file(str(ldm_path))
    hf = ControlNetModel.from_pretrained(str(folder))
    mapping = _upstream_ldm_names(hf.state_dict())
    assert set(ours) == set(mapping.values())  # no control_model. prefix: what upstream writes
    for hf_key, ldm_key in mapping.items():
        assert torch.equal(ours[ldm_key], hf.state_dict()[hf_key]), hf_key
    assert ours["zero_convs.0.0.weight"].abs().max() > 0  # trained: the zero convs moved
    single = ControlNetModel.from_single_file(str(ldm_path), config=str(folder), local_files_only=True)
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in single.state_dict().items())


def test_saved_controlnet_gives_equal_outputs_in_diffusers_and_gen_img(trained, tiny_sd, tmp_path):
    from diffusers import ControlNetModel

    ldm_path, folder = trained
    unet = load_models(str(tiny_sd["sd1"]["safetensors"])).unet
    g = torch.Generator().manual_seed(0)
    x, ctx, hint = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.rand(2, 3, 64, 64)
    t = torch.tensor([10, 500])
    outs, weights_seen = [], []
    for model in (ControlNetModel.from_single_file(str(ldm_path), config=str(folder), local_files_only=True),
                  load_control_net(str(ldm_path), unet), load_control_net(str(folder), unet)):
        weights_seen.append(model.state_dict())
        with torch.no_grad():
            down, mid = model.eval()(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        outs.append(torch.cat([d.flatten() for d in down] + [mid.flatten()]))
    assert outs[0].abs().max() > 0
    # the same weights bit for bit; outputs to float32 rounding (a tensor's memory layout may pick another CPU
    # kernel on some parts: a CI machine differed in the last bits between the file and the folder)
    for other in weights_seen[1:]:
        assert other.keys() == weights_seen[0].keys()
        assert all(torch.equal(other[k], weights_seen[0][k]) for k in other)
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(outs[0], outs[2], rtol=1e-5, atol=1e-7)
    # gen_img: the LDM file and the Diffusers folder draw the same image, and the ControlNet changes it
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))).save(tmp_path / "h.png")
    base = ["--ckpt", str(tiny_sd["sd1"]["safetensors"]), "--W", "64", "--H", "64", "--steps", "3", "--seed", "7",
            "--prompt", "a square", "--guide_image_path", str(tmp_path / "h.png")]
    images = [np.asarray(Image.open(gen_img.main(base + ["--outdir", str(tmp_path / name), "--control_net_models",
                                                          str(path)])[0]), dtype=np.int16)
              for name, path in (("a", ldm_path), ("b", folder))]
    plain = gen_img.main(["--ckpt", str(tiny_sd["sd1"]["safetensors"]), "--W", "64", "--H", "64", "--steps", "3",
                          "--seed", "7", "--prompt", "a square", "--outdir", str(tmp_path / "c")])
    assert np.abs(images[0] - images[1]).max() <= 1  # 8-bit pixels of float32-equal images
    assert np.abs(images[0] - np.asarray(Image.open(plain[0]), dtype=np.int16)).max() > 0


@pytest.mark.parametrize("source", ["ldm", "prefixed", "diffusers"])
def test_continue_from_controlnet_model(trained, tiny_sd, pairs, tmp_path, source):
    """--controlnet_model_name_or_path with learning rate 0 writes back exactly what it read."""
    ldm_path, folder = trained
    path = {"ldm": ldm_path, "diffusers": folder, "prefixed": tmp_path / "prefixed.safetensors"}[source]
    if source == "prefixed":  # released ControlNets carry control_model.
        save_file({"control_model." + k: v for k, v in load_file(str(ldm_path)).items()}, str(path))
    out = tmp_path / "again"
    train_controlnet.main(_args(tiny_sd["sd1"]["safetensors"], pairs, out, 1, "--learning_rate", "0",
                                "--controlnet_model_name_or_path", str(path), "--save_model_as", "ckpt"))
    a, b = load_file(str(ldm_path)), weights(out / "cn.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_samples_follow_the_cn_image(tiny_sd, pairs, tmp_path):
    out = tmp_path / "out"
    train_controlnet.main(_args(tiny_sd["sd1"]["safetensors"], pairs, out, 2, "--learning_rate", "1e-2",
                *hint_prompts(tmp_path / "p.txt", pairs[1] / "0.png")))
    assert samples_differ(out / "sample")


def _exit_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train_controlnet.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_bad_input_is_one_line_before_models_load(tiny_sd, pairs, tmp_path, capsys, monkeypatch):
    from library.training.runners import run_common

    monkeypatch.setattr(run_common, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    model = tiny_sd["sd1"]["safetensors"]
    images, cond = pairs
    out = tmp_path / "out"
    no_cond = common_args(model, out, 1, "--train_data_dir", str(images))
    assert "--conditioning_data_dir" in _exit_line(capsys, no_cond)
    cases = {"--controlnet_model_name_or_path": ["--controlnet_model_name_or_path", str(tmp_path / "nope")],
             "--fp8_base": ["--fp8_base", "--mixed_precision", "bf16"], "--in_json": ["--in_json", str(tmp_path / "j")],
             "--alpha_mask": ["--alpha_mask"], "--full_bf16": ["--full_bf16"]}
    for option, extra in cases.items():
        assert option in _exit_line(capsys, _args(model, pairs, out, 1, *extra)), option
    (cond / "0.png").unlink()
    assert "missing conditioning images" in _exit_line(capsys, _args(model, pairs, out, 1))
    assert not out.exists()


def test_help_lists_every_v087_option(capsys):
    """The options of sd-scripts v0.8.7's train_controlnet.py ``setup_parser()``, written out from its calls."""
    with pytest.raises(SystemExit):
        train_controlnet.main(["--help"])
    text = capsys.readouterr().out
    missing = [o for o in UPSTREAM_OPTIONS if f"--{o} " not in text and f"--{o}\n" not in text
               and f"--{o}," not in text]
    assert not missing


UPSTREAM_OPTIONS = (
    # add_logging_arguments
    "console_log_level", "console_log_file", "console_log_simple",
    # add_sd_models_arguments
    "v2", "v_parameterization", "pretrained_model_name_or_path", "tokenizer_cache_dir",
    # add_dataset_arguments(parser, False, True, True)
    "train_data_dir", "cache_info", "shuffle_caption", "caption_separator", "caption_extension", "caption_extention",
    "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix",
    "caption_suffix", "color_aug", "flip_aug", "face_crop_aug_range", "random_crop", "debug_dataset", "resolution",
    "cache_latents", "vae_batch_size", "cache_latents_to_disk", "enable_bucket", "min_bucket_reso",
    "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "token_warmup_min", "token_warmup_step",
    "dataset_class", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
    "in_json", "dataset_repeats",
    # add_training_arguments(parser, False)
    "output_dir", "output_name", "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
    "huggingface_token", "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface",
    "async_upload", "save_precision", "save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio",
    "save_last_n_epochs", "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state", "save_state",
    "save_state_on_train_end", "resume", "train_batch_size", "max_token_length", "mem_eff_attn", "torch_compile",
    "dynamo_backend", "xformers", "sdpa", "vae", "max_train_steps", "max_train_epochs", "max_data_loader_n_workers",
    "persistent_data_loader_workers", "seed", "gradient_checkpointing", "gradient_accumulation_steps",
    "mixed_precision", "full_fp16", "full_bf16", "fp8_base", "ddp_timeout", "ddp_gradient_as_bucket_view",
    "ddp_static_graph", "clip_skip", "logging_dir", "log_with", "log_prefix", "log_tracker_name", "wandb_run_name",
    "log_tracker_config", "wandb_api_key", "noise_offset", "noise_offset_random_strength", "multires_noise_iterations",
    "ip_noise_gamma", "ip_noise_gamma_random_strength", "multires_noise_discount", "adaptive_noise_scale",
    "zero_terminal_snr", "min_timestep", "max_timestep", "loss_type", "huber_schedule", "huber_c", "lowram",
    "highvram", "sample_every_n_steps", "sample_at_first", "sample_every_n_epochs", "sample_prompts",
    "sample_sampler", "metadata_title", "metadata_author", "metadata_description", "metadata_license",
    "metadata_tags", "config_file", "output_config",
    # deepspeed_utils.add_deepspeed_arguments
    "deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
    "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model", "fp16_master_weights_and_gradients",
    # add_optimizer_arguments
    "optimizer_type", "use_8bit_adam", "use_lion_optimizer", "learning_rate", "max_grad_norm", "optimizer_args",
    "lr_scheduler_type", "lr_scheduler_args", "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles",
    "lr_scheduler_power",
    # config_util.add_config_arguments
    "dataset_config",
    # custom_train_functions.add_custom_train_arguments
    "min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "debiased_estimation_loss",
    "weighted_captions",
    # train_controlnet.py's own
    "save_model_as", "controlnet_model_name_or_path", "conditioning_data_dir",
)


def test_docs_config_example_trains(tiny_sd, pairs, tmp_path):
    """The worked example of docs/train_controlnet.md, with the tiny model and data swapped in."""
    images, cond = pairs
    swaps = {"pretrained_model_name_or_path": str(tiny_sd["sd1"]["safetensors"]), "train_data_dir": str(images),
             "conditioning_data_dir": str(cond), "caption_extension": ".caption", "output_dir": str(tmp_path / "out"),
             "resolution": "64,64", "max_train_steps": 1, "sample_prompts": None, "sample_every_n_steps": None,
             "mixed_precision": "no", "xformers": None, "optimizer_type": "AdamW", "max_data_loader_n_workers": 0,
             "enable_bucket": None}
    doc = Path(__file__).resolve().parents[2] / "docs" / "train_controlnet.md"
    config, command = doc_example(doc, swaps, tmp_path / "cn.toml", "# controlnet.toml")
    train_controlnet.main(["--config_file", str(config)])
    saved = load_file(str(tmp_path / "out" / "my_controlnet.safetensors"))
    assert "input_hint_block.0.weight" in saved and "zero_convs.0.0.weight" in saved
    assert shlex.split(command)[:3] == ["accelerate", "launch", "train_controlnet.py"]
