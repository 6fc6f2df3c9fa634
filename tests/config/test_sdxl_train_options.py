"""sdxl_train.py's --help lists every option of sd-scripts v0.8.7's sdxl_train.py (issue 20 item 1).

The spec's option table has no sdxl_train column, so the list is written out here from upstream's argparse
calls (v0.8.7 ``sdxl_train.setup_parser``: add_logging_arguments, add_sd_models_arguments,
add_dataset_arguments(True, True, True), add_training_arguments(support_dreambooth=False),
add_masked_loss_arguments, add_deepspeed_arguments, add_sd_saving_arguments, add_optimizer_arguments,
add_config_arguments, add_custom_train_arguments, add_sdxl_training_arguments and its own six).
"""
import argparse

import pytest

import sdxl_train
from library.config.options_beyond import BEYOND_SD_SCRIPTS_OPTIONS

UPSTREAM_V087 = {
    "adaptive_noise_scale", "async_upload", "block_lr", "bucket_no_upscale", "bucket_reso_steps", "cache_info",
    "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
    "caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_extension", "caption_extention",
    "caption_prefix", "caption_separator", "caption_suffix", "caption_tag_dropout_rate", "clip_skip", "color_aug",
    "conditioning_data_dir", "config_file", "console_log_file", "console_log_level", "console_log_simple",
    "dataset_class", "dataset_config", "dataset_repeats", "ddp_gradient_as_bucket_view", "ddp_static_graph",
    "ddp_timeout", "debiased_estimation_loss", "debug_dataset", "deepspeed", "diffusers_xformers", "dynamo_backend",
    "enable_bucket", "enable_wildcard", "face_crop_aug_range", "flip_aug", "fp16_master_weights_and_gradients",
    "fp8_base", "full_bf16", "full_fp16", "gradient_accumulation_steps", "gradient_checkpointing", "highvram",
    "huber_c", "huber_schedule", "huggingface_path_in_repo", "huggingface_repo_id", "huggingface_repo_type",
    "huggingface_repo_visibility", "huggingface_token", "in_json", "ip_noise_gamma",
    "ip_noise_gamma_random_strength", "keep_tokens", "keep_tokens_separator", "learning_rate", "learning_rate_te1",
    "learning_rate_te2", "log_prefix", "log_tracker_config", "log_tracker_name", "log_with", "logging_dir",
    "loss_type", "lowram", "lr_scheduler", "lr_scheduler_args", "lr_scheduler_num_cycles", "lr_scheduler_power",
    "lr_scheduler_type", "lr_warmup_steps", "masked_loss", "max_bucket_reso", "max_data_loader_n_workers",
    "max_grad_norm", "max_timestep", "max_token_length", "max_train_epochs", "max_train_steps", "mem_eff_attn",
    "metadata_author", "metadata_description", "metadata_license", "metadata_tags", "metadata_title",
    "min_bucket_reso", "min_snr_gamma", "min_timestep", "mixed_precision", "multires_noise_discount",
    "multires_noise_iterations", "no_half_vae", "noise_offset", "noise_offset_random_strength",
    "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device", "offload_param_nvme_path",
    "optimizer_args", "optimizer_type", "output_config", "output_dir", "output_name",
    "persistent_data_loader_workers", "pretrained_model_name_or_path", "random_crop", "reg_data_dir", "resolution",
    "resume", "resume_from_huggingface", "sample_at_first", "sample_every_n_epochs", "sample_every_n_steps",
    "sample_prompts", "sample_sampler", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
    "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state", "save_model_as",
    "save_n_epoch_ratio", "save_precision", "save_state", "save_state_on_train_end", "save_state_to_huggingface",
    "scale_v_pred_loss_like_noise_pred", "sdpa", "secondary_separator", "seed", "shuffle_caption",
    "token_warmup_min", "token_warmup_step", "tokenizer_cache_dir", "torch_compile", "train_batch_size",
    "train_data_dir", "train_text_encoder", "use_8bit_adam", "use_lion_optimizer", "use_safetensors", "v2",
    "v_parameterization", "v_pred_like_loss", "vae", "vae_batch_size", "wandb_api_key", "wandb_run_name",
    "weighted_captions", "xformers", "zero3_init_flag", "zero3_save_16bit_model", "zero_stage", "zero_terminal_snr",
}
# ours beyond that list: --alpha_mask (every trainer here, spec cli-options), docs/beyond-sd-scripts.md's options,
# and the fused optimizer step of sd-scripts v0.9 (what makes SDXL full fine-tuning fit on one card)
OURS_BEYOND = {"alpha_mask", "fused_backward_pass", "fused_optimizer_groups", *BEYOND_SD_SCRIPTS_OPTIONS}


def test_every_upstream_option_and_nothing_unexplained():
    parser = sdxl_train.setup_parser()
    dests = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    assert UPSTREAM_V087 - dests == set()
    assert dests - UPSTREAM_V087 == OURS_BEYOND


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        sdxl_train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for dest in UPSTREAM_V087 | OURS_BEYOND:
        assert f"--{dest}" in text, dest


def test_sdxl_train_defaults():
    args = sdxl_train.setup_parser().parse_args([])
    assert (args.block_lr, args.learning_rate_te1, args.learning_rate_te2, args.fused_optimizer_groups) == (None,) * 4
    assert not (args.train_text_encoder or args.diffusers_xformers or args.no_half_vae or args.fused_backward_pass)
    assert args.save_model_as is None and not args.use_safetensors and not hasattr(args, "prior_loss_weight")
