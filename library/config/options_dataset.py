"""Dataset options shared by every trainer: sd-scripts' ``add_dataset_arguments`` (spec cli-options §3).

Names, types and defaults are exactly the spec's; a ``--dataset_config`` file overrides most of them
per dataset/subset through the fallback chain of spec dataset-config §3.
"""
from __future__ import annotations

from pathlib import Path

from library.config.options_common import Container, section
from library.config.ranges import FRACTION, at_least, ranged


def add_dataset_arguments(
    parser: Container, support_dreambooth: bool, support_caption: bool, support_caption_dropout: bool
) -> None:
    """Image/caption/bucket options (spec cli-options §3).

    ``support_dreambooth`` adds ``--reg_data_dir``; ``support_caption`` adds ``--in_json`` and
    ``--dataset_repeats`` (fine-tuning metadata); ``support_caption_dropout`` the three dropout options.
    """
    g = section(parser, "dataset", "images, captions, augmentation, buckets, latent caching")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="training image folder. DreamBooth mode: parent of 'N_token' sub-folders "
                        "(N = repeats); fine-tuning mode (--in_json): the image folder")
    g.add_argument("--cache_info", action="store_true",
                   help="DreamBooth subsets: cache captions and image sizes in <image_dir>/metadata_cache.json "
                        "(later runs skip the folder scan; the cache is not checked for staleness)")
    _add_caption_arguments(g)
    _add_image_arguments(g)

    if support_caption_dropout:
        ranged(g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                              help="probability of training a sample with an empty caption (default: 0.0)"), FRACTION)
        ranged(g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                              help="use empty captions for the whole epoch every N epochs (default: 0 = never)"),
               at_least(0, "0 = never"))
        ranged(g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                              help="probability of dropping each (non-kept) tag (default: 0.0)"), FRACTION)

    if support_dreambooth:
        g.add_argument("--reg_data_dir", type=str, default=None,
                       help="regularization images: parent of 'N_class' sub-folders (DreamBooth mode)")

    if support_caption:
        g.add_argument("--in_json", type=str, default=None,
                       help="fine-tuning metadata JSON (captions/tags per image); selects fine-tuning mode "
                            "when no --dataset_config is given")
        ranged(g.add_argument("--dataset_repeats", type=int, default=1,
                              help="repeats of the fine-tuning dataset per epoch (default: 1)"), at_least(1))


def _add_caption_arguments(g: Container) -> None:
    """Caption files and the per-step caption pipeline (shuffle, keep, wildcards, prefix / suffix)."""
    g.add_argument("--shuffle_caption", action="store_true",
                   help="shuffle the tags of each caption (split on --caption_separator)")
    g.add_argument("--caption_separator", type=str, default=",",
                   help="separator between tags for shuffling and tag dropout (default: ',')")
    g.add_argument("--caption_extension", type=str, default=".caption",
                   help="extension of caption files next to the images (default: .caption; "
                        "a leading dot is added if missing)")
    g.add_argument("--caption_extention", type=str, default=None,
                   help="legacy misspelling of --caption_extension; when given it overrides it")
    ranged(g.add_argument("--keep_tokens", type=int, default=0,
                          help="keep the first N tags in place: never shuffled or dropped (default: 0)"), at_least(0))
    g.add_argument("--keep_tokens_separator", type=str, default="",
                   help="marker in a caption that splits a fixed head (and an optional fixed tail after a "
                        "second marker) from the shuffled middle, e.g. '|||'")
    g.add_argument("--secondary_separator", type=str, default=None,
                   help="inner separator: tags joined by it move as one tag when shuffling and dropping, "
                        "and it is replaced by --caption_separator afterwards, e.g. ';;;'")
    g.add_argument("--enable_wildcard", action="store_true",
                   help="enable '{a|b|c}' random choices in captions and multi-line captions "
                        "(one line is picked per step)")
    g.add_argument("--caption_prefix", type=str, default=None,
                   help="text put before every caption (joined with one space)")
    g.add_argument("--caption_suffix", type=str, default=None,
                   help="text put after every caption (joined with one space)")


def _add_image_arguments(g: Container) -> None:
    """Augmentation, resolution, latent caching, buckets, tag warm-up, masks, dataset class."""
    g.add_argument("--color_aug", action="store_true",
                   help="weak hue/gamma colour augmentation (cannot be combined with latent caching)")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flip with probability 0.5")
    g.add_argument("--face_crop_aug_range", type=str, default=None,
                   help="'lo,hi' scale range for face-centred random crops (needs face info in the file name), "
                        "e.g. '2.0,4.0'")
    g.add_argument("--random_crop", action="store_true",
                   help="random instead of centre crop (cannot be combined with latent caching)")
    g.add_argument("--debug_dataset", action="store_true",
                   help="show the prepared batches (images, captions, buckets) and exit without training")
    g.add_argument("--resolution", type=str, default=None,
                   help="training resolution: 'SIZE' (square) or 'WIDTH,HEIGHT', e.g. '512' or '768,512'")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode every image once with the VAE and keep the latents in memory "
                        "(disables color_aug/random_crop)")
    ranged(g.add_argument("--vae_batch_size", type=int, default=1, help="batch size when caching latents (default: 1)"),
           at_least(1))
    g.add_argument("--cache_latents_to_disk", action="store_true",
                   help="cache latents to <image>.npz next to each image and reuse them in later runs; "
                        "implies --cache_latents")
    g.add_argument("--enable_bucket", action="store_true",
                   help="aspect-ratio bucketing: batch images of similar aspect ratio at their own size")
    ranged(g.add_argument("--min_bucket_reso", type=int, default=256,
                          help="smallest bucket side in pixels (default: 256)"),
           at_least(1))
    ranged(g.add_argument("--max_bucket_reso", type=int, default=1024,
                          help="largest bucket side in pixels (default: 1024)"),
           at_least(1))
    ranged(g.add_argument("--bucket_reso_steps", type=int, default=64,
                          help="bucket sides are multiples of this (default: 64; SDXL needs a multiple of 32)"),
           at_least(1))
    g.add_argument("--bucket_no_upscale", action="store_true",
                   help="one bucket per image size, never upscaling (min/max_bucket_reso are ignored)")
    ranged(g.add_argument("--token_warmup_min", type=int, default=1,
                          help="tag-count warmup: number of tags used at step 0 (default: 1)"), at_least(0))
    ranged(g.add_argument("--token_warmup_step", type=float, default=0,
                          help="tag-count warmup: step at which all tags are used; a value < 1 is a fraction of "
                               "--max_train_steps; 0 disables the warmup (default)"),
           at_least(0, "0 = no warmup, < 1 = a fraction of --max_train_steps"))
    # [v0.9.0+] listed by the spec; v0.8.x masks come only from ControlNet-style subsets (spec §5).
    g.add_argument("--alpha_mask", action="store_true",
                   help="use the image's alpha channel as the loss mask (with --masked_loss)")
    g.add_argument("--dataset_class", type=str, default=None,
                   help="custom dataset class 'package.module.Class'; replaces --dataset_config and folder mode")


def add_masked_loss_arguments(parser: Container) -> None:
    """``--conditioning_data_dir`` and ``--masked_loss`` (spec cli-options §5; not fine_tune.py)."""
    g = section(parser, "masked loss", "weight the loss per pixel by a mask image")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="folder of mask images (same file stems as the training images); fallback value for "
                        "ControlNet-style subsets")
    g.add_argument("--masked_loss", action="store_true",
                   help="multiply the per-pixel loss by the mask (R channel: 255 = full weight, 0 = ignored); "
                        "also allows ControlNet-style subsets (conditioning_data_dir) in --dataset_config")


def add_config_arguments(parser: Container) -> None:
    """``--dataset_config`` (spec cli-options §9)."""
    g = section(parser, "dataset config", "datasets described in a file")
    g.add_argument("--dataset_config", type=Path, default=None,
                   help="dataset definition (.toml or .json, spec dataset-config §2); when given, "
                        "--train_data_dir, --reg_data_dir and --in_json are ignored")
