"""Options of the two ControlNet trainers: train_controlnet.py and sdxl_train_control_net_lllite.py (sd-scripts
v0.8.7's own options of each script; the shared groups come from ``options.build_parser``)."""
from __future__ import annotations

from library.config.options_common import Container, section
from library.config.ranges import at_least, between, ranged

CONTROLNET_SCRIPT = "train_controlnet"
LLLITE_SCRIPT = "sdxl_train_control_net_lllite"
CONTROLNET_SCRIPTS = (CONTROLNET_SCRIPT, LLLITE_SCRIPT)

DESCRIPTIONS = {
    CONTROLNET_SCRIPT: "Train a ControlNet (v1.x) for Stable Diffusion 1.x/2.x from image + conditioning-image "
                       "pairs.",
    LLLITE_SCRIPT: "Train a ControlNet-LLLite for Stable Diffusion XL from image + conditioning-image pairs.",
}

# beyond upstream's choices (None, ckpt, pt, safetensors): a Diffusers ControlNetModel folder
CONTROLNET_SAVE_AS = [None, "ckpt", "pt", "safetensors", "diffusers", "diffusers_safetensors"]


def _conditioning_data_dir(g: Container) -> None:
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="folder of conditioning images (hints), one per training image with the same file stem; "
                        "used with --train_data_dir (ignored with --dataset_config, which names it per subset)")


def add_controlnet_arguments(parser: Container) -> None:
    """train_controlnet.py's own options."""
    g = section(parser, "ControlNet", "train_controlnet.py options")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=CONTROLNET_SAVE_AS,
                   help="format of the saved ControlNet: safetensors (default), ckpt or pt in the original (LDM) "
                        "ControlNet layout, or diffusers / diffusers_safetensors for a Diffusers ControlNetModel "
                        "folder (beyond sd-scripts)")
    g.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="ControlNet to continue training: an LDM ControlNet file (.safetensors/.ckpt/.pth) or a "
                        "Diffusers ControlNetModel folder (default: a new ControlNet copied from the U-Net)")
    _conditioning_data_dir(g)


def add_lllite_arguments(parser: Container) -> None:
    """sdxl_train_control_net_lllite.py's own options."""
    g = section(parser, "ControlNet-LLLite", "sdxl_train_control_net_lllite.py options")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
                   help="file format of the saved LLLite (default: safetensors)")
    ranged(g.add_argument("--cond_emb_dim", type=int, default=None,
                          help="channels of the conditioning-image embedding of each module (required; 32 is "
                               "typical; must be even)"), at_least(2))
    g.add_argument("--network_weights", type=str, default=None, help="LLLite weights to continue training from")
    ranged(g.add_argument("--network_dim", type=int, default=None,
                          help="width (rank) of each module's down / mid / up layers (required; 64 is typical)"),
           at_least(1))
    ranged(g.add_argument("--network_dropout", type=float, default=None,
                          help="dropout on each module's mid activations during training (0 or none: no dropout)"),
           between(0, 1, hi_open=True))
    _conditioning_data_dir(g)
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 even with mixed precision")
