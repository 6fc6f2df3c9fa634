"""Options owned by one trainer each (spec cli-options §12)."""
from __future__ import annotations

from library.config.options_common import Container, section
from library.config.ranges import at_least, between, ranged


def add_network_trainer_arguments(parser: Container) -> None:
    """train_network.py / sdxl_train_network.py options (spec cli-options §12, N X)."""
    g = section(parser, "network (LoRA) training", "train_network.py options")
    g.add_argument("--no_metadata", action="store_true",
                   help="write only the minimum ss_* metadata keys into the saved network")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
                   help="file format of the saved network (default: safetensors; ckpt/pt carry no metadata)")
    ranged(g.add_argument("--unet_lr", type=float, default=None, help="learning rate of the U-Net modules "
                                                                       "(default: --learning_rate)"), at_least(0))
    ranged(g.add_argument("--text_encoder_lr", type=float, default=None,
                          help="learning rate of the text-encoder modules (default: --learning_rate)"), at_least(0))
    g.add_argument("--network_weights", type=str, default=None, help="initial network weights to continue from")
    g.add_argument("--network_module", type=str, default=None,
                   help="Python module of the network, e.g. networks.lora or lycoris.kohya")
    ranged(g.add_argument("--network_dim", type=int, default=None, help="network rank (networks.lora: 4 if not given)"),
           at_least(1))
    ranged(g.add_argument("--network_alpha", type=float, default=1,
                          help="network alpha; the output is scaled by alpha/dim (default: 1)"),
           at_least(0, "0 = the same as the rank: scale 1"))
    ranged(g.add_argument("--network_dropout", type=float, default=None,
                          help="dropout on the rank activations during training (0.1 is typical)"),
           between(0, 1, hi_open=True))
    g.add_argument("--network_args", type=str, default=None, nargs="*",
                   help="extra key=value arguments for the network module (values stay strings), "
                        "e.g. conv_dim=4 conv_alpha=1")
    g.add_argument("--network_train_unet_only", action="store_true", help="train only the U-Net modules")
    g.add_argument("--network_train_text_encoder_only", action="store_true",
                   help="train only the text-encoder modules")
    g.add_argument("--training_comment", type=str, default=None, help="comment stored in ss_training_comment")
    g.add_argument("--dim_from_weights", action="store_true",
                   help="take ranks (and alphas) from --network_weights instead of --network_dim")
    ranged(g.add_argument("--scale_weight_norms", type=float, default=None,
                          help="max-norm regularization: scale down modules whose weight norm exceeds this (1.0 is "
                               "typical)"),
           at_least(0, "0 = off"))
    g.add_argument("--base_weights", type=str, default=None, nargs="*",
                   help="network files merged into the base model before training")
    g.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                   help="merge multiplier of each --base_weights file (missing ones: 1.0)")
    g.add_argument("--no_half_vae", action="store_true",
                   help="keep the VAE in float32 even with mixed precision")


def add_dreambooth_arguments(parser: Container) -> None:
    """train_db.py options (spec cli-options §12, D)."""
    g = section(parser, "DreamBooth training", "train_db.py options")
    ranged(g.add_argument("--learning_rate_te", type=float, default=None,
                          help="learning rate of the text encoder (default: same as the U-Net)"), at_least(0))
    g.add_argument("--no_token_padding", action="store_true",
                   help="pad captions per batch instead of to the maximum length (old Diffusers DreamBooth)")
    ranged(g.add_argument("--stop_text_encoder_training", type=int, default=None,
                          help="stop training the text encoder at step N (-1: never train it; default: train "
                               "throughout)"),
           at_least(-1, "-1 = never train the text encoder"))
    g.add_argument("--no_half_vae", action="store_true",
                   help="keep the VAE in float32 when caching latents")


def add_finetune_arguments(parser: Container) -> None:
    """fine_tune.py options (spec cli-options §12, F)."""
    g = section(parser, "fine-tuning", "fine_tune.py options")
    g.add_argument("--diffusers_xformers", action="store_true",
                   help="enable xformers through Diffusers' own switch instead of the attention replacement")
    g.add_argument("--train_text_encoder", action="store_true", help="also train the text encoder (default: U-Net only)")
    ranged(g.add_argument("--learning_rate_te", type=float, default=None,
                          help="learning rate of the text encoder (default: --learning_rate)"), at_least(0))
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 even with mixed precision")


def add_textual_inversion_arguments(parser: Container) -> None:
    """train_textual_inversion.py options (spec cli-options §12, T)."""
    g = section(parser, "textual inversion", "train_textual_inversion.py options")
    g.add_argument("--save_model_as", type=str, default="pt", choices=[None, "ckpt", "pt", "safetensors"],
                   help="file format of the saved embedding (default: pt)")
    g.add_argument("--weights", type=str, default=None, help="initial embedding file to continue from")
    ranged(g.add_argument("--num_vectors_per_token", type=int, default=1,
                          help="number of embedding vectors for the new token (default: 1)"), at_least(1))
    g.add_argument("--token_string", type=str, default=None,
                   help="the new token, which must not exist in the tokenizer yet (also the default output name)")
    g.add_argument("--init_word", type=str, default=None,
                   help="word(s) whose embeddings initialise the new vectors")
    g.add_argument("--use_object_template", action="store_true",
                   help="ignore captions and use random object templates ('a photo of a {}' ...)")
    g.add_argument("--use_style_template", action="store_true",
                   help="ignore captions and use random style templates ('a painting in the style of {}' ...)")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 even with mixed precision")


def add_sdxl_train_arguments(parser: Container) -> None:
    """sdxl_train.py options (sd-scripts v0.8.7's own, plus the fused optimizer step of v0.9)."""
    g = section(parser, "SDXL fine-tuning", "sdxl_train.py options")
    ranged(g.add_argument("--learning_rate_te1", type=float, default=None,
                          help="learning rate of text encoder 1 (ViT-L) with --train_text_encoder (default: "
                               "--learning_rate; 0 keeps it frozen)"), at_least(0))
    ranged(g.add_argument("--learning_rate_te2", type=float, default=None,
                          help="learning rate of text encoder 2 (OpenCLIP bigG) with --train_text_encoder (default: "
                               "--learning_rate; 0 keeps it frozen)"), at_least(0))
    g.add_argument("--diffusers_xformers", action="store_true",
                   help="enable xformers through Diffusers' own switch (U-Net and VAE) instead of the attention "
                        "replacement")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="also train the text encoders (default: U-Net only)")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 even with mixed precision")
    g.add_argument("--block_lr", type=str, default=None,
                   help="learning rates of the 23 U-Net blocks, comma-separated: time/label embedding, "
                        "input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out (a block at 0 is left out of the "
                        "optimizer)")
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="(sd-scripts v0.9) step AdaFactor on each parameter inside the backward pass and free its "
                        "gradient at once: a full set of gradients never exists (needs --optimizer_type AdaFactor)")
    ranged(g.add_argument("--fused_optimizer_groups", type=int, default=None,
                          help="(sd-scripts v0.9) split the parameters into N optimizers, each stepped inside the "
                               "backward pass as soon as its gradients are complete (any optimizer)"), at_least(1))
