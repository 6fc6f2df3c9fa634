"""flux_train_network.py's own options: sd-scripts' ``add_dit_training_arguments`` and
``add_flux_train_arguments`` (library/train_util.py, library/flux_train_utils.py), names, types, defaults and
choices as upstream. Options this project does not implement yet are declared (a config file or front-end may
carry them) and refused in one line when set (library/training/runners/flux_checks.py)."""
from __future__ import annotations

from library.config.options_common import Container, section
from library.config.ranges import Range, above, at_least, ranged

FLUX_SCRIPT = "flux_train_network"
FLUX_DESCRIPTION = "Train a FLUX.1 LoRA (networks.lora_flux) on FLUX.1 dev or schnell."


def add_dit_training_arguments(parser: Container) -> None:
    """upstream's ``train_util.add_dit_training_arguments``."""
    g = section(parser, "DiT training")
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="encode every caption with T5-XXL (and a frozen CLIP-L) once; no caption shuffling / "
                        "dropout; not with a T5-XXL LoRA")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="cache the text-encoder outputs in <image>_flux_te_outputs.npz (implies "
                        "--cache_text_encoder_outputs)")
    ranged(g.add_argument("--text_encoder_batch_size", type=int, default=None,
                          help="text encoder batch size for caching (default: the dataset's batch size)"),
           at_least(1))
    g.add_argument("--disable_mmap_load_safetensors", action="store_true",
                   help="upstream: read safetensors without mmap (WSL); here files are always read tensor by "
                        "tensor, so this changes nothing")
    g.add_argument("--weighting_scheme", type=str, default="uniform",
                   choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"],
                   help="timestep density of --timestep_sampling sigma (logit_normal, mode; uniform = none) and "
                        "the loss weight of --model_prediction_type sigma_scaled (sigma_sqrt, cosmap)")
    ranged(g.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal weighting scheme"),
           Range(note="any mean"))
    ranged(g.add_argument("--logit_std", type=float, default=1.0, help="std of the logit_normal weighting scheme"),
           above(0))
    ranged(g.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode weighting scheme"),
           Range(note="any scale (0 = uniform)"))
    ranged(g.add_argument("--blocks_to_swap", type=int, default=None,
                          help="keep this many transformer blocks in CPU memory, each copied to the device just "
                               "before it runs (FLUX.1: half of them, rounded down, double blocks and twice the "
                               "rest single blocks, as sd-scripts; at most 35): less device memory, slower "
                               "steps"), at_least(0))


def add_flux_train_arguments(parser: Container) -> None:
    """upstream's ``flux_train_utils.add_flux_train_arguments`` and flux_train_network's own."""
    g = section(parser, "FLUX.1")
    g.add_argument("--clip_l", type=str, default=None,
                   help="CLIP-L text encoder file (transformers layout, e.g. clip_l.safetensors) or folder; needed "
                        "with a BFL single-file model")
    g.add_argument("--t5xxl", type=str, default=None,
                   help="T5-XXL encoder file (e.g. t5xxl_fp16.safetensors) or folder; needed with a BFL single file")
    g.add_argument("--ae", type=str, default=None,
                   help="FLUX.1 autoencoder file (ae.safetensors) or folder; needed with a BFL single file")
    g.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="FLUX ControlNet (upstream's flux_train_control_net; refused here)")
    ranged(g.add_argument("--t5xxl_max_token_length", type=int, default=None,
                          help="T5-XXL token length (default: 512 for dev, 256 for schnell)"), at_least(1))
    g.add_argument("--apply_t5_attn_mask", action="store_true",
                   help="mask T5-XXL padding in the T5 encoder and in the transformer's attention")
    ranged(g.add_argument("--guidance_scale", type=float, default=3.5,
                          help="guidance value fed to FLUX.1 dev (a guidance-distilled model) while training "
                               "(default: 3.5; sd-scripts' docs use 1.0); schnell has no guidance input"),
           at_least(0))
    g.add_argument("--timestep_sampling", choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"],
                   default="sigma",
                   help="how sigma is drawn: sigma (a step of the --discrete_flow_shift schedule, by "
                        "--weighting_scheme), uniform, sigmoid (of a scaled normal), shift (sigmoid, then shifted "
                        "by --discrete_flow_shift), flux_shift (sigmoid, then FLUX.1's resolution-dependent shift)")
    ranged(g.add_argument("--sigmoid_scale", type=float, default=1.0,
                          help="scale of the normal draw of sigmoid / shift / flux_shift sampling (default: 1.0)"),
           above(0))
    g.add_argument("--model_prediction_type", choices=["raw", "additive", "sigma_scaled"], default="sigma_scaled",
                   help="what the loss compares with noise - latents: raw (the output), additive (output + noisy "
                        "input), sigma_scaled (noisy input - sigma * output, weighted by --weighting_scheme; "
                        "sd-scripts' default, its docs advise raw)")
    ranged(g.add_argument("--discrete_flow_shift", type=float, default=3.0,
                          help="shift of the sigma / shift timestep sampling (default: 3.0)"), above(0))
    g.add_argument("--model_type", type=str, choices=["flux", "chroma"], default="flux",
                   help="flux (default) or chroma (upstream; chroma is refused here)")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="store the transformer's Linear weights in fp8 (T5-XXL stays in the training dtype); "
                        "needs --mixed_precision fp16 or bf16")
    g.add_argument("--split_mode", action="store_true",
                   help="deprecated (as upstream): --blocks_to_swap 18 unless --blocks_to_swap is given")


# Options current sd-scripts gives flux_train_network.py that v0.8.7's train_network.py has not (its newer
# train_network.py and train_util.py): declared with upstream's defaults, so a front-end's FLUX config that carries
# them at their defaults loads; any other value is refused in one line (library/training/runners/flux_checks.py).
# name -> (argparse keywords, what upstream does with it)
NEWER_UPSTREAM_OPTIONS: dict[str, tuple[dict, str]] = {
    "cpu_offload_checkpointing": (dict(action="store_true"), "gradient checkpoints kept in CPU memory"),
    "initial_epoch": (dict(type=int, default=None), "the epoch number to start counting from"),
    "initial_step": (dict(type=int, default=None), "the step number to start counting from"),
    "skip_until_initial_step": (dict(action="store_true"), "skip the batches before --initial_step"),
    "fused_backward_pass": (dict(action="store_true"), "the optimizer step inside backward (sdxl_train has it)"),
    "huber_scale": (dict(type=float, default=1.0), "the Huber loss scale (here always 1)"),
    "lr_decay_steps": (dict(type=float, default=0), "decay steps of the warmup-stable-decay schedule"),
    "lr_scheduler_timescale": (dict(type=int, default=None), "the inverse-sqrt schedule's time scale"),
    "lr_scheduler_min_lr_ratio": (dict(type=float, default=None), "the minimum rate of cosine-with-min-lr"),
    "resize_interpolation": (dict(type=str, default=None), "the image resize filter"),
    "skip_cache_check": (dict(action="store_true"), "skip checking the contents of cache files"),
    "log_config": (dict(action="store_true"), "log the training configuration"),
}


def add_newer_upstream_arguments(parser: Container) -> None:
    g = section(parser, "current sd-scripts (declared; refused unless at upstream's default)")
    for name, (kwargs, what) in NEWER_UPSTREAM_OPTIONS.items():
        action = g.add_argument(f"--{name}", **kwargs, help=f"upstream: {what}; not supported here yet")
        if kwargs.get("type") in (int, float):
            ranged(action, Range(note="refused unless at upstream's default"))


def add_flux_arguments(parser: Container) -> None:
    """Everything flux_train_network.py adds to train_network.py's options."""
    add_dit_training_arguments(parser)
    add_flux_train_arguments(parser)
    add_newer_upstream_arguments(parser)
