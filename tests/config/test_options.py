"""Option groups against the spec tables (spec cli-options §1-§12)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from library.config.options import SAME_PARSER, SCRIPTS, build_parser
from library.config.options_beyond import BEYOND_SD_SCRIPTS_OPTIONS

LETTER = {"N": "train_network", "X": "sdxl_train_network", "D": "train_db", "F": "fine_tune",
          "T": "train_textual_inversion"}

# (option, type in the spec, default, scripts that have it) transcribed from spec cli-options §1-§12;
# the script columns follow the table at the top of cli-options.md and the per-group columns.
SPEC_OPTIONS = [
    ("console_log_level", "str", None, "NXDFT"),
    ("console_log_file", "str", None, "NXDFT"),
    ("console_log_simple", "flag", False, "NXDFT"),
    ("v2", "flag", False, "NXDFT"),
    ("v_parameterization", "flag", False, "NXDFT"),
    ("pretrained_model_name_or_path", "str", None, "NXDFT"),
    ("tokenizer_cache_dir", "str", None, "NXDFT"),
    ("train_data_dir", "str", None, "NXDFT"),
    ("cache_info", "flag", False, "NXDFT"),
    ("shuffle_caption", "flag", False, "NXDFT"),
    ("caption_separator", "str", ',', "NXDFT"),
    ("caption_extension", "str", '.caption', "NXDFT"),
    ("caption_extention", "str", None, "NXDFT"),
    ("keep_tokens", "int", 0, "NXDFT"),
    ("keep_tokens_separator", "str", '', "NXDFT"),
    ("secondary_separator", "str", None, "NXDFT"),
    ("enable_wildcard", "flag", False, "NXDFT"),
    ("caption_prefix", "str", None, "NXDFT"),
    ("caption_suffix", "str", None, "NXDFT"),
    ("color_aug", "flag", False, "NXDFT"),
    ("flip_aug", "flag", False, "NXDFT"),
    ("face_crop_aug_range", "str", None, "NXDFT"),
    ("random_crop", "flag", False, "NXDFT"),
    ("debug_dataset", "flag", False, "NXDFT"),
    ("resolution", "str", None, "NXDFT"),
    ("cache_latents", "flag", False, "NXDFT"),
    ("vae_batch_size", "int", 1, "NXDFT"),
    ("cache_latents_to_disk", "flag", False, "NXDFT"),
    ("enable_bucket", "flag", False, "NXDFT"),
    ("min_bucket_reso", "int", 256, "NXDFT"),
    ("max_bucket_reso", "int", 1024, "NXDFT"),
    ("bucket_reso_steps", "int", 64, "NXDFT"),
    ("bucket_no_upscale", "flag", False, "NXDFT"),
    ("token_warmup_min", "int", 1, "NXDFT"),
    ("token_warmup_step", "float", 0, "NXDFT"),
    ("alpha_mask", "flag", False, "NXDFT"),
    ("dataset_class", "str", None, "NXDFT"),
    ("caption_dropout_rate", "float", 0.0, "NXDF"),
    ("caption_dropout_every_n_epochs", "int", 0, "NXDF"),
    ("caption_tag_dropout_rate", "float", 0.0, "NXDF"),
    ("reg_data_dir", "str", None, "NXDT"),
    ("in_json", "str", None, "NXFT"),
    ("dataset_repeats", "int", 1, "NXFT"),
    ("output_dir", "str", None, "NXDFT"),
    ("output_name", "str", None, "NXDFT"),
    ("huggingface_repo_id", "str", None, "NXDFT"),
    ("huggingface_repo_type", "str", None, "NXDFT"),
    ("huggingface_path_in_repo", "str", None, "NXDFT"),
    ("huggingface_token", "str", None, "NXDFT"),
    ("huggingface_repo_visibility", "str", None, "NXDFT"),
    ("save_state_to_huggingface", "flag", False, "NXDFT"),
    ("resume_from_huggingface", "flag", False, "NXDFT"),
    ("async_upload", "flag", False, "NXDFT"),
    ("save_precision", "str", None, "NXDFT"),
    ("save_every_n_epochs", "int", None, "NXDFT"),
    ("save_every_n_steps", "int", None, "NXDFT"),
    ("save_n_epoch_ratio", "int", None, "NXDFT"),
    ("save_last_n_epochs", "int", None, "NXDFT"),
    ("save_last_n_epochs_state", "int", None, "NXDFT"),
    ("save_last_n_steps", "int", None, "NXDFT"),
    ("save_last_n_steps_state", "int", None, "NXDFT"),
    ("save_state", "flag", False, "NXDFT"),
    ("save_state_on_train_end", "flag", False, "NXDFT"),
    ("resume", "str", None, "NXDFT"),
    ("train_batch_size", "int", 1, "NXDFT"),
    ("max_token_length", "int", None, "NXDFT"),
    ("mem_eff_attn", "flag", False, "NXDFT"),
    ("torch_compile", "flag", False, "NXDFT"),
    ("dynamo_backend", "str", 'inductor', "NXDFT"),
    ("xformers", "flag", False, "NXDFT"),
    ("sdpa", "flag", False, "NXDFT"),
    ("vae", "str", None, "NXDFT"),
    ("max_train_steps", "int", 1600, "NXDFT"),
    ("max_train_epochs", "int", None, "NXDFT"),
    ("max_data_loader_n_workers", "int", 8, "NXDFT"),
    ("persistent_data_loader_workers", "flag", False, "NXDFT"),
    ("seed", "int", None, "NXDFT"),
    ("gradient_checkpointing", "flag", False, "NXDFT"),
    ("gradient_accumulation_steps", "int", 1, "NXDFT"),
    ("mixed_precision", "str", 'no', "NXDFT"),
    ("full_fp16", "flag", False, "NXDFT"),
    ("full_bf16", "flag", False, "NXDFT"),
    ("fp8_base", "flag", False, "NXDFT"),
    ("ddp_timeout", "int", None, "NXDFT"),
    ("ddp_gradient_as_bucket_view", "flag", False, "NXDFT"),
    ("ddp_static_graph", "flag", False, "NXDFT"),
    ("clip_skip", "int", None, "NXDFT"),
    ("lowram", "flag", False, "NXDFT"),
    ("highvram", "flag", False, "NXDFT"),
    ("logging_dir", "str", None, "NXDFT"),
    ("log_with", "str", None, "NXDFT"),
    ("log_prefix", "str", None, "NXDFT"),
    ("log_tracker_name", "str", None, "NXDFT"),
    ("wandb_run_name", "str", None, "NXDFT"),
    ("log_tracker_config", "str", None, "NXDFT"),
    ("wandb_api_key", "str", None, "NXDFT"),
    ("noise_offset", "float", None, "NXDFT"),
    ("noise_offset_random_strength", "flag", False, "NXDFT"),
    ("multires_noise_iterations", "int", None, "NXDFT"),
    ("multires_noise_discount", "float", 0.3, "NXDFT"),
    ("ip_noise_gamma", "float", None, "NXDFT"),
    ("ip_noise_gamma_random_strength", "flag", False, "NXDFT"),
    ("adaptive_noise_scale", "float", None, "NXDFT"),
    ("zero_terminal_snr", "flag", False, "NXDFT"),
    ("min_timestep", "int", None, "NXDFT"),
    ("max_timestep", "int", None, "NXDFT"),
    ("loss_type", "str", 'l2', "NXDFT"),
    ("huber_schedule", "str", 'snr', "NXDFT"),
    ("huber_c", "float", 0.1, "NXDFT"),
    ("sample_every_n_steps", "int", None, "NXDFT"),
    ("sample_every_n_epochs", "int", None, "NXDFT"),
    ("sample_at_first", "flag", False, "NXDFT"),
    ("sample_prompts", "str", None, "NXDFT"),
    ("sample_sampler", "str", 'ddim', "NXDFT"),
    ("config_file", "str", None, "NXDFT"),
    ("output_config", "flag", False, "NXDFT"),
    ("metadata_title", "str", None, "NXDFT"),
    ("metadata_author", "str", None, "NXDFT"),
    ("metadata_description", "str", None, "NXDFT"),
    ("metadata_license", "str", None, "NXDFT"),
    ("metadata_tags", "str", None, "NXDFT"),
    ("prior_loss_weight", "float", 1.0, "NXDT"),
    ("conditioning_data_dir", "str", None, "NXDT"),
    ("masked_loss", "flag", False, "NXDT"),
    ("deepspeed", "flag", False, "NXDFT"),
    ("zero_stage", "int", 2, "NXDFT"),
    ("offload_optimizer_device", "str", None, "NXDFT"),
    ("offload_optimizer_nvme_path", "str", None, "NXDFT"),
    ("offload_param_device", "str", None, "NXDFT"),
    ("offload_param_nvme_path", "str", None, "NXDFT"),
    ("zero3_init_flag", "flag", False, "NXDFT"),
    ("zero3_save_16bit_model", "flag", False, "NXDFT"),
    ("fp16_master_weights_and_gradients", "flag", False, "NXDFT"),
    ("save_model_as", "str", None, "DF"),
    ("use_safetensors", "flag", False, "DF"),
    ("optimizer_type", "str", '', "NXDFT"),
    ("use_8bit_adam", "flag", False, "NXDFT"),
    ("use_lion_optimizer", "flag", False, "NXDFT"),
    ("learning_rate", "float", 2e-6, "NXDFT"),
    ("max_grad_norm", "float", 1.0, "NXDFT"),
    ("optimizer_args", "str*", None, "NXDFT"),
    ("lr_scheduler_type", "str", '', "NXDFT"),
    ("lr_scheduler_args", "str*", None, "NXDFT"),
    ("lr_scheduler", "str", 'constant', "NXDFT"),
    ("lr_warmup_steps", "int", 0, "NXDFT"),
    ("lr_scheduler_num_cycles", "int", 1, "NXDFT"),
    ("lr_scheduler_power", "float", 1, "NXDFT"),
    ("dataset_config", "Path", None, "NXDFT"),
    ("min_snr_gamma", "float", None, "NXDFT"),
    ("scale_v_pred_loss_like_noise_pred", "flag", False, "NXDFT"),
    ("v_pred_like_loss", "float", None, "NXDFT"),
    ("debiased_estimation_loss", "flag", False, "NXDFT"),
    ("weighted_captions", "flag", False, "NXDF"),
    ("cache_text_encoder_outputs", "flag", False, "X"),
    ("cache_text_encoder_outputs_to_disk", "flag", False, "X"),
    ("no_metadata", "flag", False, "NX"),
    ("save_model_as", "str", 'safetensors', "NX"),
    ("unet_lr", "float", None, "NX"),
    ("text_encoder_lr", "float", None, "NX"),
    ("network_weights", "str", None, "NX"),
    ("network_module", "str", None, "NX"),
    ("network_dim", "int", None, "NX"),
    ("network_alpha", "float", 1, "NX"),
    ("network_dropout", "float", None, "NX"),
    ("network_args", "str*", None, "NX"),
    ("network_train_unet_only", "flag", False, "NX"),
    ("network_train_text_encoder_only", "flag", False, "NX"),
    ("training_comment", "str", None, "NX"),
    ("dim_from_weights", "flag", False, "NX"),
    ("scale_weight_norms", "float", None, "NX"),
    ("base_weights", "str*", None, "NX"),
    ("base_weights_multiplier", "float*", None, "NX"),
    ("no_half_vae", "flag", False, "NXDFT"),
    ("learning_rate_te", "float", None, "DF"),
    ("no_token_padding", "flag", False, "D"),
    ("stop_text_encoder_training", "int", None, "D"),
    ("diffusers_xformers", "flag", False, "F"),
    ("train_text_encoder", "flag", False, "F"),
    ("save_model_as", "str", 'pt', "T"),
    ("weights", "str", None, "T"),
    ("num_vectors_per_token", "int", 1, "T"),
    ("token_string", "str", None, "T"),
    ("init_word", "str", None, "T"),
    ("use_object_template", "flag", False, "T"),
    ("use_style_template", "flag", False, "T"),
]

# (script letter, option, choices) from the spec tables
SPEC_CHOICES = [
    ("N", "save_precision", [None, "float", "fp16", "bf16"]),
    ("N", "max_token_length", [None, 150, 225]),
    ("N", "mixed_precision", ["no", "fp16", "bf16"]),
    ("N", "log_with", ["tensorboard", "wandb", "all"]),
    ("N", "loss_type", ["l2", "huber", "smooth_l1"]),
    ("N", "huber_schedule", ["constant", "exponential", "snr"]),
    ("N", "zero_stage", [0, 1, 2, 3]),
    ("N", "offload_optimizer_device", [None, "cpu", "nvme"]),
    ("N", "offload_param_device", [None, "cpu", "nvme"]),
    ("N", "save_model_as", [None, "ckpt", "pt", "safetensors"]),
    ("T", "save_model_as", [None, "ckpt", "pt", "safetensors"]),
    ("D", "save_model_as", [None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"]),
    ("N", "console_log_level", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    ("N", "dynamo_backend", ["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs",
                             "ofi", "fx2trt", "onnxrt"]),
    ("N", "sample_sampler", ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                             "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]),
]

_PARSERS = {s: build_parser(s) for s in SCRIPTS}
# --save_model_as has three rows (different defaults per script): the union says who has it at all
_HAS = {o: "".join(r[3] for r in SPEC_OPTIONS if r[0] == o) for o, _, _, _ in SPEC_OPTIONS}


def _action(script: str, dest: str) -> argparse.Action | None:
    return next((a for a in _PARSERS[script]._actions if a.dest == dest), None)


@pytest.mark.parametrize("script", SCRIPTS)
def test_parse_empty_command_line(script):
    args = _PARSERS[script].parse_args([])
    assert args.max_train_steps == 1600


@pytest.mark.parametrize("option,typ,default,letters", SPEC_OPTIONS, ids=[f"{o[0]}-{o[3]}" for o in SPEC_OPTIONS])
def test_option_matches_spec(option, typ, default, letters):
    for letter, script in LETTER.items():
        action = _action(script, option)
        if letter not in letters:
            assert letter in _HAS[option] or action is None, f"{script} must not have --{option}"
            continue
        assert action is not None, f"{script} lacks --{option}"
        assert action.option_strings == [f"--{option}"]
        assert action.default == default and type(action.default) is type(default)
        if typ == "flag":
            assert isinstance(action, argparse._StoreTrueAction)
        else:
            base = typ.rstrip("*")
            assert action.type is {"str": str, "int": int, "float": float, "Path": Path}[base]
            assert (action.nargs == "*") == typ.endswith("*")


@pytest.mark.parametrize("letter,option,choices", SPEC_CHOICES)
def test_choices_match_spec(letter, option, choices):
    assert list(_action(LETTER[letter], option).choices) == choices


# sdxl_train has no column in the spec's table: tests/config/test_sdxl_train_options.py checks it against the
# option list of sd-scripts v0.8.7's own sdxl_train.py
@pytest.mark.parametrize("script", [s for s in SCRIPTS if SAME_PARSER.get(s, s) in LETTER.values()])
def test_every_option_is_in_the_spec_table(script):
    """No option beyond the spec's (plus argparse's own --help and docs/beyond-sd-scripts.md's)."""
    letter = next(k for k, v in LETTER.items() if v == SAME_PARSER.get(script, script))
    expected = {o for o, _, _, letters in SPEC_OPTIONS if letter in letters} | set(BEYOND_SD_SCRIPTS_OPTIONS)
    actual = {a.dest for a in _PARSERS[script]._actions if not isinstance(a, argparse._HelpAction)}
    assert actual == expected


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_and_help_is_sectioned(script):
    parser = _PARSERS[script]
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.dest
    text = parser.format_help()
    for title in ("base model", "dataset", "optimizer and learning-rate schedule", "training logs"):
        assert f"{title}:" in text


def test_unknown_script_rejected():
    with pytest.raises(ValueError, match="train_network"):
        build_parser("train_lora")


def test_groups_accept_a_plain_parser_or_a_group():
    from library.config.options import add_sd_models_arguments

    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("mine")
    add_sd_models_arguments(group)
    assert group._group_actions and parser.parse_args(["--v2"]).v2
