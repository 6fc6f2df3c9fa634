"""Training options shared by every trainer: sd-scripts' ``add_training_arguments`` (spec cli-options §4).

The function adds one ``--help`` section per sub-table of the spec (§4.1 ... §4.6) when it is given a
parser; names, types, defaults and choices are exactly the spec's.
"""
from __future__ import annotations

from library.config.options_common import Container, section
from library.config.ranges import FRACTION, SEED, above, at_least, between, ranged

SAMPLERS = [
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
]
DYNAMO_BACKENDS = [
    "eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt", "onnxrt",
]


def add_training_arguments(parser: Container, support_dreambooth: bool) -> None:
    """All of spec cli-options §4; ``--prior_loss_weight`` only when ``support_dreambooth``."""
    _add_output_arguments(section(parser, "output, saving, resume", "spec cli-options §4.1"))
    _add_performance_arguments(section(parser, "batch, precision, performance", "spec cli-options §4.2"))
    _add_logging_arguments(section(parser, "training logs", "spec cli-options §4.3"))
    _add_noise_arguments(section(parser, "noise, timesteps, loss", "spec cli-options §4.4"))
    _add_sample_arguments(section(parser, "sample images during training", "spec cli-options §4.5"))
    g = section(parser, "config file and model metadata", "spec cli-options §4.6")
    _add_config_and_metadata_arguments(g)
    if support_dreambooth:
        ranged(g.add_argument("--prior_loss_weight", type=float, default=1.0,
                              help="loss weight of regularization images (default: 1.0)"), at_least(0))


def _add_output_arguments(g: Container) -> None:
    g.add_argument("--output_dir", type=str, default=None, help="folder for saved models (created when saving)")
    g.add_argument("--output_name", type=str, default=None,
                   help="base name of saved files without extension (default depends on the trainer)")
    g.add_argument("--huggingface_repo_id", type=str, default=None, help="upload saved files to this hub repository")
    g.add_argument("--huggingface_repo_type", type=str, default=None, help="hub repository type, e.g. 'model'")
    g.add_argument("--huggingface_path_in_repo", type=str, default=None, help="folder inside the hub repository")
    g.add_argument("--huggingface_token", type=str, default=None,
                   help="hub access token (secret: prefer putting it in the --config_file TOML)")
    g.add_argument("--huggingface_repo_visibility", type=str, default=None,
                   help="'public' makes a newly created repository public; anything else keeps it private")
    g.add_argument("--save_state_to_huggingface", action="store_true", help="also upload saved state folders")
    g.add_argument("--resume_from_huggingface", action="store_true",
                   help="--resume names a hub location: '{repo_id}/{path_in_repo}:{revision}:{repo_type}'")
    g.add_argument("--async_upload", action="store_true", help="upload in the background without waiting")
    g.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of saved weights (default: keep the training dtype)")
    ranged(g.add_argument("--save_every_n_epochs", type=int, default=None,
                          help="save a checkpoint every N epochs (the last epoch is always saved)"),
           at_least(1, "leave it unset to save only at the end"))
    ranged(g.add_argument("--save_every_n_steps", type=int, default=None, help="save a checkpoint every N steps"),
           at_least(1, "leave it unset to save only at the end"))
    ranged(g.add_argument("--save_n_epoch_ratio", type=int, default=None,
                          help="save about N checkpoints over the whole run (overrides --save_every_n_epochs)"),
           at_least(0, "0 = off"))
    ranged(g.add_argument("--save_last_n_epochs", type=int, default=None,
                          help="keep only the newest N epoch checkpoints, deleting older ones"), at_least(1))
    ranged(g.add_argument("--save_last_n_epochs_state", type=int, default=None,
                          help="keep only the newest N epoch state folders (overrides --save_last_n_epochs for "
                               "states)"),
           at_least(0, "0 = as --save_last_n_epochs"))
    ranged(g.add_argument("--save_last_n_steps", type=int, default=None,
                          help="keep only step checkpoints saved within the last N steps"), at_least(1))
    ranged(g.add_argument("--save_last_n_steps_state", type=int, default=None,
                          help="keep only step state folders saved within the last N steps"),
           at_least(0, "0 = as --save_last_n_steps"))
    g.add_argument("--save_state", action="store_true",
                   help="save the training state (optimizer, scheduler, RNG) with every checkpoint and at the end")
    g.add_argument("--save_state_on_train_end", action="store_true", help="save the training state only at the end")
    g.add_argument("--resume", type=str, default=None, help="state folder to resume training from")


def _add_performance_arguments(g: Container) -> None:
    ranged(g.add_argument("--train_batch_size", type=int, default=1,
                          help="batch size per device (a dataset's batch_size overrides it; default: 1)"),
           at_least(1))
    g.add_argument("--max_token_length", type=int, default=None, choices=[None, 150, 225],
                   help="caption length in tokens: 150 or 225 (2 or 3 chunks of 75); default 75")
    g.add_argument("--mem_eff_attn", action="store_true",
                   help="memory-efficient attention in the U-Net (pure PyTorch, slower)")
    g.add_argument("--torch_compile", action="store_true", help="compile the model with torch.compile (dynamo)")
    g.add_argument("--dynamo_backend", type=str, default="inductor", choices=DYNAMO_BACKENDS,
                   help="torch.compile backend (default: inductor)")
    g.add_argument("--xformers", action="store_true", help="use xformers attention in the U-Net")
    g.add_argument("--sdpa", action="store_true", help="use PyTorch scaled_dot_product_attention in the U-Net")
    g.add_argument("--vae", type=str, default=None,
                   help="replacement VAE: a .ckpt/.safetensors file or a Diffusers folder")
    ranged(g.add_argument("--max_train_steps", type=int, default=1600,
                          help="number of optimizer steps (default: 1600)"),
           at_least(0, "0 only with --max_train_epochs, which sets the steps"))
    ranged(g.add_argument("--max_train_epochs", type=int, default=None,
                          help="number of epochs; overrides --max_train_steps"),
           at_least(1, "leave it unset to train by --max_train_steps"))
    ranged(g.add_argument("--max_data_loader_n_workers", type=int, default=8,
                          help="DataLoader worker processes, at most the CPU count (default: 8; 0 = main process)"),
           at_least(0, "0 = load in the main process"))
    g.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="keep DataLoader workers alive between epochs (faster epoch start, more memory)")
    ranged(g.add_argument("--seed", type=int, default=None, help="random seed"), SEED)
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, slower)")
    ranged(g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                          help="accumulate gradients over N batches before each optimizer step (default: 1)"),
           at_least(1))
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="autocast dtype; frozen weights are also cast to it (default: no)")
    g.add_argument("--full_fp16", action="store_true",
                   help="keep trainable weights and gradients in fp16 (needs --mixed_precision fp16)")
    g.add_argument("--full_bf16", action="store_true",
                   help="keep trainable weights and gradients in bf16 (needs --mixed_precision bf16)")
    g.add_argument("--fp8_base", action="store_true",
                   help="store the frozen U-Net and text encoder in float8_e4m3fn (needs mixed precision)")
    ranged(g.add_argument("--ddp_timeout", type=int, default=None, help="DDP process-group timeout in minutes"),
           at_least(0, "0 = the default timeout"))
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view=True")
    g.add_argument("--ddp_static_graph", action="store_true", help="DDP static_graph=True")
    ranged(g.add_argument("--clip_skip", type=int, default=None,
                          help="SD1/SD2: use the text encoder's N-th hidden state from the end (2 is common); "
                               "ignored for SDXL"), at_least(1, "1 = the last layer"))
    g.add_argument("--lowram", action="store_true",
                   help="load models straight onto the GPU (for machines with little RAM, e.g. Colab)")
    g.add_argument("--highvram", action="store_true",
                   help="do not free the CUDA cache during latent caching (faster with plenty of VRAM)")


def _add_logging_arguments(g: Container) -> None:
    g.add_argument("--logging_dir", type=str, default=None,
                   help="enable logging into <logging_dir>/<log_prefix><timestamp> (TensorBoard by default)")
    g.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
                   help="tracker(s) to log to; tensorboard and all need --logging_dir")
    g.add_argument("--log_prefix", type=str, default=None, help="prefix of the timestamped log folder")
    g.add_argument("--log_tracker_name", type=str, default=None,
                   help="tracker project name (default depends on the trainer)")
    g.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    g.add_argument("--log_tracker_config", type=str, default=None,
                   help="TOML file with tracker init arguments (replaces --wandb_run_name)")
    g.add_argument("--wandb_api_key", type=str, default=None,
                   help="wandb API key used to log in before training (secret: prefer the --config_file TOML)")


def _add_noise_arguments(g: Container) -> None:
    ranged(g.add_argument("--noise_offset", type=float, default=None,
                          help="offset-noise strength for darker/brighter images (about 0.1 is typical)"),
           at_least(0, "0 = off"))
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="draw the offset-noise strength uniformly from [0, noise_offset] each step")
    ranged(g.add_argument("--multires_noise_iterations", type=int, default=None,
                          help="multi-resolution (pyramid) noise iterations (6-10 is typical)"),
           at_least(0, "0 = off"))
    ranged(g.add_argument("--multires_noise_discount", type=float, default=0.3,
                          help="weight base of each pyramid-noise level (default: 0.3)"), FRACTION)
    ranged(g.add_argument("--ip_noise_gamma", type=float, default=None,
                          help="input-perturbation noise strength (about 0.1 is typical)"), at_least(0, "0 = off"))
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="draw the input-perturbation strength uniformly from [0, ip_noise_gamma] each step")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="add scale * |mean of latents| to --noise_offset (requires --noise_offset)")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the noise schedule to zero terminal SNR (use with --v_parameterization)")
    ranged(g.add_argument("--min_timestep", type=int, default=None,
                          help="lowest sampled timestep, inclusive (default: 0)"),
           between(0, 1000))
    ranged(g.add_argument("--max_timestep", type=int, default=None,
                          help="highest sampled timestep, exclusive (default: 1000)"), between(0, 1000))
    g.add_argument("--loss_type", type=str, default="l2", choices=["l2", "huber", "smooth_l1"],
                   help="element-wise loss (default: l2)")
    g.add_argument("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
                   help="how the Huber parameter depends on the timestep (default: snr)")
    ranged(g.add_argument("--huber_c", type=float, default=0.1, help="Huber loss parameter (default: 0.1)"), above(0))


def _add_sample_arguments(g: Container) -> None:
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="generate sample images every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None,
                   help="generate sample images every N epochs (turns step sampling off)")
    g.add_argument("--sample_at_first", action="store_true", help="generate sample images before training starts")
    g.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    g.add_argument("--sample_sampler", type=str, default="ddim", choices=SAMPLERS,
                   help="sampler for sample images (default: ddim)")


def _add_config_and_metadata_arguments(g: Container) -> None:
    g.add_argument("--config_file", type=str, default=None,
                   help="TOML file of option values (keys are option names without '--'; tables may group "
                        "them); command-line options override it")
    g.add_argument("--output_config", action="store_true",
                   help="write the options that differ from their defaults to --config_file and exit")
    g.add_argument("--metadata_title", type=str, default=None, help="model title in the metadata (modelspec)")
    g.add_argument("--metadata_author", type=str, default=None, help="model author in the metadata (modelspec)")
    g.add_argument("--metadata_description", type=str, default=None,
                   help="model description in the metadata (modelspec)")
    g.add_argument("--metadata_license", type=str, default=None, help="model license in the metadata (modelspec)")
    g.add_argument("--metadata_tags", type=str, default=None,
                   help="comma-separated tags in the metadata (modelspec)")
