"""gen_img prompt lines -> per-image requests (seeds, inline options, img2img inputs) -> U-Net batches.

spec generation §1.2 (seeds, images_per_prompt, n_iter, batch_size), §2 (sizes), §3 (prompt lines, dynamic
prompts). Seeds follow gen_img.py: per-image seeds drawn from `Random(--seed)` in [0, 2³²−1], with its broken
"one prompt, one image -> the seed itself" path fixed (spec pitfall 6). Dynamic-prompt picks use their own
`Random(--seed)`, so `--seed` reproduces them too (upstream never seeds them).
"""
from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from PIL import Image

from library.errors import UserError
from library.sampling.controlnet import guide_images_for
from library.sampling.deep_shrink import DeepShrink, resolve_deep_shrink
from library.sampling.dynamic_prompts import expand_dynamic_prompts
from library.sampling.flux_options import FLUX_SIZE_MULTIPLE, check_line_family
from library.sampling.flux_pipeline import DEFAULT_GUIDANCE
from library.sampling.gen_options import check_line_ranges
from library.sampling.gradual_latent import GradualLatent, check_usable, resolve_gradual_latent
from library.sampling.img2img import fit_init_image, list_images, open_image
from library.sampling.pipeline import GenSettings, ImageSpec
from library.sampling.prompt_file import PromptOptions, pad_with_last, parse_prompt_line
from library.sampling.regional import applied_network_count, check_sub_prompts, regional_requested

logger = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1  # gen_img.py's range (spec pitfall 12)


@dataclass
class Request:
    """One image to generate, with what its file name and PNG text need."""

    spec: ImageSpec
    settings: GenSettings
    raw_prompt: str
    index: int  # global image index (0-based), for --sequential_file_name
    clip_prompt: str | None = None
    network_muls: list[float] | None = None
    source_path: str | None = None  # init image file, for --use_original_file_name
    num_sub_prompts: int | None = None  # regional LoRA: the prompt's " AND " parts

    def batch_key(self) -> tuple:
        """Images share a U-Net batch only when all of this is equal (spec §1.2 `--batch_size`)."""
        return (self.settings, tuple(self.network_muls or ()), self.spec.init_image is not None,
                self.spec.mask is not None, self.num_sub_prompts)


@dataclass
class InitImages:
    """`--image_path` / `--mask_path` files, cycled over the images (or one per prompt from PNG text)."""

    images: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    guides: list[str] = field(default_factory=list)  # `--guide_image_path` files (ControlNet hints)
    control_nets: int = 0  # how many ControlNets: each image takes that many guide images


def line_deep_shrink(args: argparse.Namespace, options: PromptOptions) -> DeepShrink | None:
    """Deep Shrink of one prompt line: `--ds_*` overridden by the line's `--dsd1/--dst1/--dsd2/--dst2/--dsr`.

    Unlike upstream (where a line's override stays set on the U-Net for every later line), it holds for this
    line only.
    """
    return resolve_deep_shrink(args.ds_depth_1, args.ds_timesteps_1, args.ds_depth_2, args.ds_timesteps_2,
                               args.ds_ratio, options.overrides())


def line_gradual_latent(args: argparse.Namespace, options: PromptOptions) -> GradualLatent | None:
    """Gradual Latent of one prompt line: `--gradual_latent_*` overridden by `--glt/--glr/--gle/--gls/--glsn/--glus`.

    As with Deep Shrink, a line's override holds for this line only (upstream keeps it for later lines).
    """
    return resolve_gradual_latent(args.gradual_latent_timesteps, args.gradual_latent_ratio,
                                  args.gradual_latent_ratio_step, args.gradual_latent_every_n_steps,
                                  args.gradual_latent_s_noise, args.gradual_latent_unsharp_params, options.overrides())


def check_line_supported(line: str, args: argparse.Namespace, flux_name: str | None = None) -> None:
    """Refuse options that do not suit the model (``flux_name``: "dev" / "schnell" for FLUX.1, None for SD), bad
    Deep Shrink / Gradual Latent values of a line (and Gradual Latent without Euler-a)."""
    prompt, options = parse_prompt_line(line)
    check_line_family(options, line, flux_name)
    if regional_requested(args) and "{" not in prompt:  # dynamic prompts are checked once expanded
        check_sub_prompts(prompt, applied_network_count(args))
    check_line_ranges(options, line)
    try:
        line_deep_shrink(args, options)
        if line_gradual_latent(args, options) is not None:
            check_usable(args.sampler, inpaint=bool(args.mask_path) and not regional_requested(args))
    except UserError as e:
        raise UserError(f"{e}: {line}") from None


def read_prompt_file(path: str) -> list[str]:
    """`--from_file`: UTF-8 lines; blank lines and lines starting with `#` skipped. spec §1.2."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--from_file {path}: cannot read ({e})") from None
    return [line for line in lines if line and not line.startswith("#")]


def prompts_from_images(paths: Sequence[str]) -> list[str]:
    """img2img without a prompt source: each PNG's `prompt` text (+ " --n " + `negative-prompt`). spec §3."""
    lines = []
    for p in paths:
        with Image.open(p) as im:
            text = getattr(im, "text", {}) or {}
        if "prompt" not in text:
            raise UserError(f"--image_path {p}: no prompt given and the image has no 'prompt' text")
        line = text["prompt"]
        if text.get("negative-prompt"):
            line += " --n " + text["negative-prompt"]
        lines.append(line)
    return lines


class RequestBuilder:
    """Turns prompt lines into `Request`s with gen_img's seed and option semantics."""

    def __init__(self, args: argparse.Namespace, default_size: int, n_networks: int, init: InitImages,
                 images_from_prompts: bool = False, total_lines: int | None = None, flux_name: str | None = None):
        self.args = args
        self.flux_name = flux_name  # "dev" / "schnell": FLUX.1 (flow-matching Euler, no CFG, 16-pixel sizes)
        self.default_size = default_size
        self.n_networks = n_networks
        self.regional = regional_requested(args) and n_networks > 0
        self.init = init
        self.images_from_prompts = images_from_prompts
        self.seed_random = random.Random(args.seed) if args.seed is not None else random.Random()
        self.dynamic_random = random.Random(args.seed) if args.seed is not None else random.Random()
        # fix of spec pitfall 6: exactly one image in total -> that image gets --seed itself
        self.single_image = (args.seed is not None and total_lines == 1 and args.n_iter == 1
                             and args.images_per_prompt == 1)
        self.iter_seed: int | None = None
        self.count = 0

    def start_iteration(self) -> None:
        """`--iter_same_seed`: one seed per iteration, drawn from Random(--seed)."""
        if self.args.iter_same_seed:
            self.iter_seed = self.seed_random.randint(0, SEED_MAX)

    def requests_for_line(self, line: str, prompt_index: int) -> Iterator[Request]:
        """All images of one prompt line: dynamic prompts expanded, seeds assigned. spec §1.2, §3."""
        check_line_supported(line, self.args, self.flux_name)
        raw_prompts = expand_dynamic_prompts(line, self.args.images_per_prompt, self.dynamic_random)
        n_images = self.args.images_per_prompt if len(raw_prompts) == 1 else len(raw_prompts)
        seeds = list(parse_prompt_line(raw_prompts[0])[1].seeds or [])
        for i in range(n_images):
            raw = raw_prompts[0] if len(raw_prompts) == 1 else raw_prompts[i]
            prompt, options = parse_prompt_line(raw)
            yield self._request(raw, prompt, options, self._next_seed(seeds), prompt_index)

    def _next_seed(self, seeds: list[int]) -> int:
        """Line seeds one per image (the last one reused), else the iteration seed, else Random(--seed)."""
        if seeds:
            return seeds.pop(0) if len(seeds) > 1 else seeds[0]
        if self.iter_seed is not None:
            return self.iter_seed
        if self.single_image:
            return self.args.seed
        return self.seed_random.randint(0, SEED_MAX)

    def _request(self, raw: str, prompt: str, o: PromptOptions, seed: int, prompt_index: int) -> Request:
        a = self.args
        init_image, mask, source = self._init_inputs(prompt_index)
        if init_image is not None:
            width, height = init_image.size  # img2img: the init image decides; --w/--h ignored (spec §2)
        else:
            width = o.width or a.W or self.default_size
            height = o.height or a.H or self.default_size
            multiple = 8 if self.flux_name is None else FLUX_SIZE_MULTIPLE
            if width % multiple or height % multiple:
                raise UserError(f"image size {width}x{height} must be a multiple of {multiple} (--W/--H or --w/--h)")
        negative_scale = o.negative_scale if (o.negative_scale is not None or o.negative_scale_disabled) \
            else a.negative_scale
        flux = self.flux_name is not None
        settings = GenSettings(width=width, height=height, steps=o.steps or a.steps,
                               scale=1.0 if flux else a.scale if o.scale is None else o.scale,
                               negative_scale=negative_scale,
                               strength=a.strength if o.strength is None else o.strength,
                               sampler="euler" if flux else a.sampler,
                               deep_shrink=line_deep_shrink(a, o), gradual_latent=line_gradual_latent(a, o),
                               guidance_scale=self._guidance(o))
        spec = ImageSpec(prompt=prompt, negative_prompt=o.negative_prompt or "", seed=seed, init_image=init_image,
                         mask=mask, control_images=self._control_images(), **self._size_cond(o))
        muls = pad_with_last(o.network_muls, self.n_networks) if o.network_muls and self.n_networks else None
        n_sub = None
        if self.regional:
            n_sub = check_sub_prompts(prompt, self.n_networks)
        request = Request(spec, settings, raw, self.count, clip_prompt=o.clip_prompt, network_muls=muls,
                          source_path=source, num_sub_prompts=n_sub)
        self.count += 1
        return request

    def _guidance(self, o: PromptOptions) -> float | None:
        """FLUX.1 dev's guidance: the line's `--g`, else `--guidance_scale`, else 3.5; None for other models."""
        if self.flux_name != "dev":
            return None
        given = o.guidance_scale if o.guidance_scale is not None else self.args.guidance_scale
        return DEFAULT_GUIDANCE if given is None else given

    def _size_cond(self, o: PromptOptions) -> dict[str, int | None]:
        names = ("original_width", "original_height", "original_width_negative", "original_height_negative",
                 "crop_top", "crop_left")
        return {n: getattr(o, n) if getattr(o, n) is not None else getattr(self.args, n) for n in names}

    def _control_images(self) -> tuple[Image.Image, ...] | None:
        """The ControlNet hints of the next image: upstream's groups of one guide image per ControlNet, cycled."""
        if not self.init.control_nets:
            return None
        paths = guide_images_for(self.init.guides, self.count, self.init.control_nets)
        return tuple(open_image(p, "RGB", "--guide_image_path") for p in paths)

    def _init_inputs(self, prompt_index: int) -> tuple[Image.Image | None, Image.Image | None, str | None]:
        """The init image and mask of the next image: one per prompt (from PNG text) or cycled. spec §1.4."""
        if not self.init.images:
            return None, None, None
        i = prompt_index if self.images_from_prompts else self.count
        path = self.init.images[i % len(self.init.images)]
        image = fit_init_image(open_image(path, "RGB", "--image_path"), self.args.W, self.args.H)
        mask = None
        if self.init.masks:
            mask = open_image(self.init.masks[i % len(self.init.masks)], "L", "--mask_path")
            mask = mask.resize(image.size, Image.LANCZOS) if mask.size != image.size else mask
        return image, mask, path


def load_init_images(args: argparse.Namespace) -> InitImages:
    """`--image_path` / `--mask_path` file lists (a mask needs an init image)."""
    regional = regional_requested(args)  # then the mask gives the networks' regions, not an inpaint mask
    if args.mask_path and not args.image_path and not regional:
        raise UserError("--mask_path needs --image_path (inpainting repaints an init image)")
    images = list_images(args.image_path, "--image_path") if args.image_path else []
    masks = list_images(args.mask_path, "--mask_path") if args.mask_path and not regional else []
    guides = [f for path in args.guide_image_path or [] for f in list_images(path, "--guide_image_path")]
    n_nets = len(args.control_net_models or args.control_net_lllite_models or [])
    if n_nets and len(guides) % n_nets:
        logger.warning("%d guide image(s) for %d ControlNets: the last %d are not used", len(guides), n_nets,
                       len(guides) % n_nets)
    if n_nets and len(guides) < n_nets:
        raise UserError(f"--guide_image_path gives {len(guides)} image(s) but {n_nets} ControlNet(s) need one each")
    return InitImages(images, masks, guides, n_nets)


def batches(requests: Iterable[Request], batch_size: int) -> Iterator[list[Request]]:
    """Group consecutive requests into batches of up to `batch_size` with equal `batch_key`. spec §1.2."""
    current: list[Request] = []
    for r in requests:
        if current and (len(current) >= batch_size or r.batch_key() != current[0].batch_key()):
            yield current
            current = []
        current.append(r)
    if current:
        yield current
