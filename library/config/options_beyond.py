"""Options beyond sd-scripts v0.8.x, shared by every trainer (docs/beyond-sd-scripts.md).

Validation loss uses the names later sd-scripts versions gave it; EMA, the non-finite guard and
``--dry_run`` are ours. Every option defaults to "off", so an sd-scripts command line behaves as before.
"""
from __future__ import annotations

from library.config.options_common import Container, section
from library.config.ranges import FRACTION, SEED, above, at_least, between, ranged

# every dest added here: the option tests accept these beside the spec's tables
BEYOND_SD_SCRIPTS_OPTIONS = (
    "validation_split", "validation_seed", "validate_every_n_steps", "validate_every_n_epochs",
    "max_validation_steps", "ema", "ema_decay", "ema_update_after_step", "ema_power", "ema_every_n_steps",
    "ema_device", "sample_with_ema", "check_grads", "dry_run", "verify_images",
    "resume_inexact",
)


def add_beyond_arguments(parser: Container) -> None:
    """Validation loss, EMA, non-finite guard and dry run (one ``--help`` section each)."""
    _add_validation_arguments(section(parser, "validation loss", "docs/beyond-sd-scripts.md"))
    _add_ema_arguments(section(parser, "EMA (exponential moving average of the trained weights)"))
    g = section(parser, "safety and planning")
    g.add_argument("--check_grads", action="store_true",
                   help="also check each parameter group's gradient norm for NaN/Inf every step and log it as "
                        "grad_norm/<group> (the loss is always checked)")
    g.add_argument("--resume_inexact", action="store_true",
                   help="let --resume continue from a state folder without its random-number-generator states "
                        "(a loud warning instead of an error; the run then does not match an uninterrupted one)")
    g.add_argument("--dry_run", action="store_true",
                   help="build the dataset and print the plan (images, buckets, steps, saves, samples, memory "
                        "estimate) without loading models, then exit")
    g.add_argument("--verify_images", action="store_true",
                   help="decode every training image before training (slow; also finds corrupt data inside a "
                        "file, which the default header and end-of-file check cannot)")


def _add_validation_arguments(g: Container) -> None:
    ranged(g.add_argument("--validation_split", type=float, default=0.0,
                          help="share of each subset's images held out for validation loss, 0.0-1.0 (a dataset "
                               "config's validation_split overrides it; 1.0 makes a subset validation-only)"),
           between(0, 1, "1 = the subset is used for validation only"))
    ranged(g.add_argument("--validation_seed", type=int, default=None,
                          help="seed of the split and of the validation noise/timesteps (default: --seed)"), SEED)
    ranged(g.add_argument("--validate_every_n_steps", type=int, default=None,
                          help="compute the validation loss every N steps (default: at the end of every epoch)"),
           at_least(1))
    ranged(g.add_argument("--validate_every_n_epochs", type=int, default=None,
                          help="compute the validation loss every N epochs (default: 1 unless "
                               "--validate_every_n_steps is given)"), at_least(1))
    ranged(g.add_argument("--max_validation_steps", type=int, default=None,
                          help="use at most N validation batches each time (default: all of them)"), at_least(1))


def _add_ema_arguments(g: Container) -> None:
    g.add_argument("--ema", action="store_true",
                   help="keep an EMA of the trained weights; saved beside each model as <name>-ema.<ext>")
    ranged(g.add_argument("--ema_decay", type=float, default=0.9999, help="maximum EMA decay (default: 0.9999)"),
           FRACTION)
    ranged(g.add_argument("--ema_update_after_step", type=int, default=0,
                          help="the EMA copies the weights until this optimizer step, then averages (default: 0)"),
           at_least(0))
    ranged(g.add_argument("--ema_power", type=float, default=None,
                          help="warm-up 1-(1+step)^-power (diffusers' use_ema_warmup; 2/3 or 3/4 are typical); "
                               "default: decay = min(ema_decay, (1+step)/(10+step))"), above(0))
    ranged(g.add_argument("--ema_every_n_steps", type=int, default=1,
                          help="update the EMA every N optimizer steps (saves time with --ema_device cpu; default: 1)"),
           at_least(1))
    g.add_argument("--ema_device", type=str, default="gpu", choices=["cpu", "gpu"],
                   help="where the EMA weights live: gpu (the training device, default) or cpu (saves "
                        "accelerator memory)")
    g.add_argument("--sample_with_ema", action="store_true",
                   help="render sample images with the EMA weights (needs --ema)")
