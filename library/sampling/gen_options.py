"""gen_img.py's command-line options (spec generation §1) and the check of not-yet-supported ones.

Names, types and defaults are upstream's. Options of features we do not implement yet are still declared
(so an sd-scripts command line parses) and `reject_unsupported` refuses them with a clear error instead of
silently ignoring them.
"""
from __future__ import annotations

import argparse
import functools
import logging
from typing import Any

from library.config.options_common import section
from library.config.ranges import FRACTION, SEED, Range, above, at_least, between, check_ranges, ranged, ranges_of
from library.errors import UserError
from library.formats.prompt_weighting import EMB_NORMALIZE_MODES
from library.log import add_logging_arguments
from library.sampling.controlnet import resolve_control_nets
from library.sampling.controlnet_lllite import resolve_lllites
from library.sampling.flux_options import add_flux_options
from library.sampling.gradual_latent import check_usable, resolve_gradual_latent
from library.sampling.prompt_file import line_option_key
from library.sampling.regional import check_regional_options, regional_requested
from library.sampling.samplers import SAMPLERS
from library.sampling.upscaler import check_upscaler_options

logger = logging.getLogger(__name__)

def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "model and precision (spec §1.1)")
    g.add_argument("--ckpt", type=str, default=None, help="model: single file, Diffusers folder (glob allowed)")
    g.add_argument("--sdxl", action="store_true", help="SDXL model")
    g.add_argument("--v1", action="store_true", help="SD1 model (no SDXL auto-detection)")
    g.add_argument("--v2", action="store_true", help="SD2 model")
    g.add_argument("--v_parameterization", action="store_true", help="v-prediction schedulers")
    g.add_argument("--vae", type=str, default=None, help="replacement VAE (file or folder)")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None, help="tokenizer cache folder (offline use)")
    g.add_argument("--fp16", action="store_true", help="models in float16")
    g.add_argument("--bf16", action="store_true", help="models in bfloat16")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32")
    g.add_argument("--xformers", action="store_true", help="xformers attention (needs xformers installed)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--diffusers_xformers", action="store_true", help="Diffusers' xformers switch")
    g.add_argument("--opt_channels_last", action="store_true", help="channels-last memory format for the U-Net")
    ranged(g.add_argument("--vae_batch_size", type=float, default=None,
                          help="VAE batch; <1 = fraction of --batch_size"),
           above(0, "< 1 = a fraction of --batch_size"))
    ranged(g.add_argument("--vae_slices", type=int, default=None, help="decode the VAE in pieces to save memory"),
           at_least(0, "0 = off"))
    ranged(g.add_argument("--clip_skip", type=int, default=None,
                          help="use hidden state -k of the text encoder (default SD1 1, SD2 2, SDXL 2)"),
           at_least(1, "1 = the last layer"))
    ranged(g.add_argument("--max_embeddings_multiples", type=int, default=None, help="prompt length = 75 x this"),
           at_least(1))
    g.add_argument("--emb_normalize_mode", type=str, default="original", choices=list(EMB_NORMALIZE_MODES),
                   help="how prompt weights are normalised (default original)")


def _add_prompt_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "prompts, batching, output (spec §1.2)")
    g.add_argument("--prompt", type=str, default=None, help="one prompt line (with inline --w/--h/--d/... options)")
    g.add_argument("--from_file", type=str, default=None, help="UTF-8 file, one prompt line per line")
    g.add_argument("--from_module", type=str, default=None, help="Python file defining get_prompter(args, pipe, networks)")
    g.add_argument("--prompter_module_args", type=str, default=None, help="free string for --from_module")
    g.add_argument("--interactive", action="store_true", help="read prompt lines from stdin (n_iter forced to 1)")
    g.add_argument("--no_preview", action="store_true", help="no preview window in interactive mode (never shown here)")
    ranged(g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt line"), at_least(1))
    ranged(g.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list"), at_least(1))
    ranged(g.add_argument("--batch_size", type=int, default=1, help="images per U-Net batch"), at_least(1))
    g.add_argument("--outdir", type=str, default="outputs", help="output folder")
    g.add_argument("--sequential_file_name", action="store_true", help="name images im_000001.png, ...")
    g.add_argument("--use_original_file_name", action="store_true", help="img2img: name = source image stem")
    g.add_argument("--shuffle_prompts", action="store_true", help="shuffle the prompt list each iteration")
    ranged(g.add_argument("--seed", type=int, default=None, help="seed: per-image seeds are drawn from Random(seed)"),
           SEED)
    g.add_argument("--iter_same_seed", action="store_true", help="one seed for all prompts of an iteration")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "sampling (spec §1.3)")
    ranged(g.add_argument("--W", type=int, default=None, help="width (default 512, SDXL 1024)"), at_least(8))
    ranged(g.add_argument("--H", type=int, default=None, help="height (default 512, SDXL 1024)"), at_least(8))
    ranged(g.add_argument("--steps", type=int, default=50, help="sampling steps"), between(1, 1000))
    g.add_argument("--sampler", type=str, default="ddim", help=f"sampler: {', '.join(SAMPLERS)}")
    g.add_argument("--scale", type=float, default=7.5, help="CFG scale (guidance only when > 1)")
    g.add_argument("--negative_scale", type=float, default=None, help="separate negative-prompt guidance scale")
    for name in ("original_width", "original_height", "original_width_negative", "original_height_negative",
                 "crop_top", "crop_left"):
        ranged(g.add_argument(f"--{name}", type=int, default=None, help=f"SDXL size conditioning: {name}"),
               at_least(0))


def _add_img2img_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "img2img / inpaint / hires fix (spec §1.4)")
    g.add_argument("--image_path", type=str, default=None, help="init image file or folder")
    g.add_argument("--mask_path", type=str, default=None, help="inpaint mask file or folder (white = repaint); with "
                   "--network_module the regions of regional LoRA instead (docs/gen_img.md)")
    ranged(g.add_argument("--strength", type=float, default=None, help="img2img strength (default 0.8)"), FRACTION)
    g.add_argument("--clip_vision_strength", type=float, default=None, help="not supported yet")
    ranged(g.add_argument("--highres_fix_scale", type=float, default=None,
                          help="hires fix: 1st stage size = final x scale"),
           Range(0, 1, lo_open=True, note="the first stage is this share of the final size"))
    ranged(g.add_argument("--highres_fix_steps", type=int, default=28, help="hires fix: 1st stage steps"), at_least(1))
    ranged(g.add_argument("--highres_fix_strength", type=float, default=None,
                          help="hires fix: 1st stage strength (img2img)"),
           FRACTION)
    g.add_argument("--highres_fix_save_1st", action="store_true", help="hires fix: also save 1st stage images")
    g.add_argument("--highres_fix_latents_upscaling", action="store_true", help="hires fix: bilinear latent upscale")
    g.add_argument("--highres_fix_upscaler", type=str, default=None,
                   help="hires fix: module whose create_upscaler(**kwargs) does the upscale")
    g.add_argument("--highres_fix_upscaler_args", type=str, default=None,
                   help="keyword arguments of create_upscaler, `k=v;k=v` (values are strings)")
    g.add_argument("--highres_fix_disable_control_net", action="store_true",
                   help="hires fix: no ControlNet in the 2nd stage")


def _add_network_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "networks and embeddings (spec §1.5)")
    g.add_argument("--network_module", type=str, default=None, nargs="*", help="network module per network")
    g.add_argument("--network_weights", type=str, default=None, nargs="*", help="weights file per network")
    g.add_argument("--network_mul", type=float, default=None, nargs="*", help="multiplier per network (1.0)")
    g.add_argument("--network_args", type=str, default=None, nargs="*", help="per network one 'k=v;k=v' string")
    g.add_argument("--network_show_meta", action="store_true", help="print the networks' safetensors metadata")
    g.add_argument("--network_merge", action="store_true", help="merge the networks into the weights")
    ranged(g.add_argument("--network_merge_n_models", type=int, default=None, help="merge only the first N networks"),
           at_least(0))
    g.add_argument("--network_pre_calc", action="store_true", help="pre-add network deltas per batch")
    ranged(g.add_argument("--network_regional_mask_max_color_codes", type=int, default=None,
                          help="regional LoRA (--mask_path with networks): network i takes colour code i+1 of the "
                               "mask (bit 0 R, bit 1 G, bit 2 B) for i below this; default: channel i (R, G, B)"),
           at_least(1))
    g.add_argument("--textual_inversion_embeddings", type=str, default=None, nargs="*",
                   help="TI embedding files (token = file stem)")


def _add_deep_shrink_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "Deep Shrink (spec §1.5; prompt options --dsd1/--dst1/--dsd2/--dst2/--dsr)")
    ranged(g.add_argument("--ds_depth_1", type=int, default=None,
                          help="enable Deep Shrink: shrink before this block (SD1/2: down block, SDXL: input block)"),
           at_least(0))
    ranged(g.add_argument("--ds_timesteps_1", type=int, default=650, help="shrink at depth 1 while timestep >= this"),
           between(0, 1000))
    ranged(g.add_argument("--ds_depth_2", type=int, default=None, help="second depth, shrunk below --ds_timesteps_1"),
           at_least(0))
    ranged(g.add_argument("--ds_timesteps_2", type=int, default=650, help="shrink at depth 2 while timestep >= this"),
           between(0, 1000))
    ranged(g.add_argument("--ds_ratio", type=float, default=0.5, help="shrink ratio (> 0)"), above(0))


def _add_gradual_latent_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "Gradual Latent, Euler-a only (spec §1.5; prompt options --glt/--glr/--gle/--gls/--glsn/--glus)")
    ranged(g.add_argument("--gradual_latent_timesteps", type=int, default=None,
                          help="enable Gradual Latent: the latent starts small and grows once the timestep is below "
                               "this"),
           between(0, 1000))
    ranged(g.add_argument("--gradual_latent_ratio", type=float, default=0.5, help="start size ratio, in (0, 1]"),
           Range(0, 1, lo_open=True))
    ranged(g.add_argument("--gradual_latent_ratio_step", type=float, default=0.125, help="ratio added at each growth"),
           above(0))
    ranged(g.add_argument("--gradual_latent_every_n_steps", type=int, default=3, help="grow every this many steps"),
           at_least(1))
    ranged(g.add_argument("--gradual_latent_s_noise", type=float, default=1.0, help="noise scale of the growing steps"),
           at_least(0))
    g.add_argument("--gradual_latent_unsharp_params", type=str, default=None,
                   help='unsharp mask after enlarging: "ksize,sigma,strength[,target_x]" (target_x 1/0, default 1)')


def _add_control_net_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "ControlNet v1.x (SD1/SD2) and ControlNet-LLLite (SDXL) (spec §1.5)")
    g.add_argument("--control_net_models", type=str, default=None, nargs="*",
                   help="ControlNet files (original LDM layout or Diffusers) or Diffusers folders")
    g.add_argument("--control_net_preps", type=str, default=None, nargs="*",
                   help="per ControlNet / LLLite: none (the guide image as is) or canny_<low>_<high> (needs "
                        "opencv-python)")
    ranged(g.add_argument("--control_net_ratios", type=float, default=None, nargs="*",
                          help="per ControlNet / LLLite: used while step/steps <= ratio (1.0)"), FRACTION)
    g.add_argument("--control_net_weights", type=float, default=None, nargs="*",
                   help="per ControlNet: multiplier of its residuals (1.0)")
    g.add_argument("--control_net_lllite_models", type=str, default=None, nargs="*",
                   help="ControlNet-LLLite files (SDXL only; not together with --control_net_models)")
    g.add_argument("--control_net_multipliers", type=float, default=None, nargs="*",
                   help="per ControlNet-LLLite: multiplier of its modules (1.0)")
    g.add_argument("--guide_image_path", type=str, default=None, nargs="*",
                   help="hint image files or folders; one per ControlNet (or LLLite) per image, cycled over the "
                        "images")


def _add_unsupported_options(p: argparse.ArgumentParser) -> None:
    g = section(p, "not supported yet (declared for command-line compatibility; giving one is an error)")
    g.add_argument("--XTI_embeddings", type=str, default=None, nargs="*", help="not supported yet")
    for name, typ, default in (("clip_guidance_scale", float, 0.0), ("clip_image_guidance_scale", float, 0.0),
                               ("vgg16_guidance_scale", float, 0.0), ("vgg16_guidance_layer", int, 20)):
        g.add_argument(f"--{name}", type=typ, default=default, help="not supported yet")


def build_gen_parser() -> argparse.ArgumentParser:
    """The full gen_img.py parser."""
    p = argparse.ArgumentParser(prog="gen_img.py", description="Generate images with SD1/SD2/SDXL: txt2img, "
                                "img2img, inpaint, hires fix, LoRA, Textual Inversion, weighted long prompts; "
                                "FLUX.1 dev / schnell: txt2img.")
    add_logging_arguments(section(p, "console log"))
    _add_model_options(p)
    add_flux_options(p)
    _add_prompt_options(p)
    _add_sampling_options(p)
    _add_img2img_options(p)
    _add_network_options(p)
    _add_deep_shrink_options(p)
    _add_gradual_latent_options(p)
    _add_control_net_options(p)
    _add_unsupported_options(p)
    return p


# option -> (what it enables, the value meaning "not given"): anything else given is rejected
UNSUPPORTED: dict[str, tuple[str, Any]] = {
    "clip_guidance_scale": ("CLIP guidance", 0.0), "clip_image_guidance_scale": ("CLIP image guidance", 0.0),
    "vgg16_guidance_scale": ("VGG16 guidance", 0.0), "clip_vision_strength": ("CLIP-vision conditioning", None),
    "XTI_embeddings": ("Extended Textual Inversion", None),
}


# enabling option -> (its tuning options, the prompt-line options that use them when the enabler is unset)
LINE_DEFAULT_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "ds_depth_1": (("ds_timesteps_1", "ds_depth_2", "ds_timesteps_2", "ds_ratio"), "--dsd1/--dst1/--dsd2/--dst2/--dsr"),
    "gradual_latent_timesteps": (("gradual_latent_ratio", "gradual_latent_ratio_step", "gradual_latent_every_n_steps",
                                  "gradual_latent_s_noise", "gradual_latent_unsharp_params"),
                                 "--glt/--glr/--gle/--gls/--glsn/--glus"),
}


@functools.lru_cache(maxsize=1)
def gen_defaults() -> argparse.Namespace:
    """gen_img's option defaults: an option whose value differs was given."""
    return build_gen_parser().parse_args([])


def warn_line_defaults_only(args: argparse.Namespace) -> None:
    """Warn once per feature when its tuning options are given without its enabling option: they then only serve
    as defaults for prompt lines giving that feature's own options (a plain --prompt ignores them)."""
    defaults = gen_defaults()
    for enabler, (names, line_options) in LINE_DEFAULT_OPTIONS.items():
        given = [f"--{n}" for n in names if getattr(args, n) != getattr(defaults, n)]
        if given and getattr(args, enabler) is None:
            logger.warning("%s without --%s: used only by prompt lines with their own %s options (as defaults)",
                           ", ".join(given), enabler, line_options)


def reject_unsupported(args: argparse.Namespace) -> None:
    """Refuse out-of-range values and every option of a feature that is not implemented yet (never silently
    ignored)."""
    check_ranges(args, build_gen_parser())
    for name, (feature, unset) in UNSUPPORTED.items():
        if getattr(args, name) != unset:
            raise UserError(f"--{name} is not supported yet ({feature}); see docs/gen_img.md")
    check_regional_options(args)
    gradual = resolve_gradual_latent(args.gradual_latent_timesteps, args.gradual_latent_ratio,
                                     args.gradual_latent_ratio_step, args.gradual_latent_every_n_steps,
                                     args.gradual_latent_s_noise, args.gradual_latent_unsharp_params)
    if gradual is not None:
        check_usable(args.sampler, inpaint=bool(args.mask_path) and not regional_requested(args))
    resolve_control_nets(args)
    resolve_lllites(args)
    check_upscaler_options(args)
    warn_line_defaults_only(args)
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 exclude each other")
    if sum(map(bool, (args.sdxl, args.v1, args.v2))) > 1:
        raise UserError("give at most one of --sdxl, --v1, --v2")


# prompt-line option field -> the gen_img option whose range it shares (fields named like their option omitted)
_LINE_FIELD_OPTION = {"width": "W", "height": "H", "seeds": "seed", "network_muls": "network_mul"}


def check_line_ranges(options: Any, line: str) -> None:
    """A prompt line's own options (``--w 0``, ``--t 1.5``, ``--glr 2``) obey the ranges of the command-line
    options they override; one ``UserError`` naming the line option, the value, the range and the line."""
    ranges = _gen_ranges()
    for field, value in options.overrides().items():
        allowed = ranges.get(_LINE_FIELD_OPTION.get(field, field))
        if allowed is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in allowed:
                raise UserError(f"prompt option --{line_option_key(field)} {item!r} is out of range: it must be "
                                f"{allowed.describe()} (as --{_LINE_FIELD_OPTION.get(field, field)}): {line}")


@functools.lru_cache(maxsize=1)
def _gen_ranges() -> dict:
    return ranges_of(build_gen_parser())
