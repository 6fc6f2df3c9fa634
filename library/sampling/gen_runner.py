"""gen_img.py's run: prompt sources -> requests -> batches -> pipeline -> PNG files. spec generation §1-§9."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import logging
import os
import random
import sys
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from library.errors import UserError
from library.fileio import atomic_path
from library.sampling.controlnet import load_control_nets, resolve_control_nets
from library.sampling.controlnet_lllite import load_lllites, resolve_lllites
from library.sampling.filenames import (a1111_parameters, gen_image_name, gen_png_text, hires_prefix,
                                        original_image_name, sequential_image_name, timestamp)
from library.sampling.flux_options import FLUX_ONLY, flux_model_name
from library.sampling.flux_pipeline import FluxGenerator
from library.sampling.flux_text import t5_max_length
from library.sampling.gen_options import gen_defaults, reject_unsupported
from library.sampling.gen_requests import (InitImages, Request, RequestBuilder, batches, check_line_supported,
                                           load_init_images, prompts_from_images, read_prompt_file)
from library.sampling.gen_setup import (LoadedNetworks, check_input_files, load_gen_flux_models, load_gen_models,
                                        load_networks, load_ti, model_dtype, resolve_ckpt, set_attention)
from library.sampling.img2img import vae_batch_size
from library.sampling.pipeline import HiresSettings, Pipeline
from library.sampling.regional import RegionalLoRA
from library.sampling.samplers import make_scheduler
from library.sampling.upscaler import load_upscaler

logger = logging.getLogger(__name__)

SDXL_SIZE_KEYS = ("original_height", "original_width", "original_height_negative", "original_width_negative",
                  "crop_top", "crop_left")


class ImageSaver:
    """File names and PNG text of gen_img outputs (spec §9), plus an A1111-style `parameters` chunk."""

    def __init__(self, args: argparse.Namespace, model_name: str, sdxl: bool):
        self.args = args
        self.model_name = model_name
        self.sdxl = sdxl
        os.makedirs(args.outdir, exist_ok=True)

    def name(self, r: Request, index_in_batch: int, ts: str, prefix: str) -> str:
        if self.args.use_original_file_name and r.source_path:
            return prefix + original_image_name(r.source_path)
        if self.args.sequential_file_name:
            return sequential_image_name(r.index, prefix)
        return gen_image_name(ts, index_in_batch, r.spec.seed, prefix)

    def png_info(self, r: Request, image: Image.Image) -> PngInfo:
        s, st = r.spec, r.settings
        sdxl_size = {k: getattr(s, k) for k in SDXL_SIZE_KEYS} if self.sdxl else None
        text = gen_png_text(prompt=s.prompt, seed=s.seed, sampler=st.sampler, steps=st.steps, scale=st.scale,
                            negative_prompt=s.negative_prompt, negative_scale=st.negative_scale,
                            clip_prompt=r.clip_prompt, raw_prompt=r.raw_prompt, sdxl_size=sdxl_size,
                            guidance_scale=st.guidance_scale)
        text["parameters"] = a1111_parameters(prompt=s.prompt, negative_prompt=s.negative_prompt, steps=st.steps,
                                              sampler=st.sampler, scale=st.scale, seed=s.seed, width=image.width,
                                              height=image.height, model=self.model_name,
                                              guidance_scale=st.guidance_scale)
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        return info

    def save(self, batch: list[Request], images: list[Image.Image], prefix: str = "") -> list[str]:
        ts = timestamp()
        paths = []
        for i, (r, image) in enumerate(zip(batch, images)):
            path = os.path.join(self.args.outdir, self.name(r, i, ts, prefix))
            with atomic_path(path) as tmp:  # a full disk never leaves a half-written image
                image.save(tmp, format="PNG", pnginfo=self.png_info(r, image))
            paths.append(path)
        return paths


class LineProgress:
    """Counts prompt lines as done once their last image is written (not when they are read: batches read ahead).

    `mark` passes a line's requests through and remembers its last one; `written` advances the bar by the lines
    a saved batch completes."""

    def __init__(self, bar: tqdm | None = None):
        self.bar = bar
        self._last: set[int] = set()

    def mark(self, requests: Iterable[Request]) -> Iterator[Request]:
        last = None
        for r in requests:
            if last is not None:
                yield last
            last = r
        if last is None:
            self._advance(1)  # a line without images is done at once
            return
        self._last.add(last.index)
        yield last

    def written(self, batch: list[Request]) -> None:
        done = [r.index for r in batch if r.index in self._last]
        self._last.difference_update(done)
        self._advance(len(done))

    def _advance(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)


class GenRun:
    """Loaded models, networks, pipeline and saver of one gen_img invocation."""

    def __init__(self, args: argparse.Namespace, pipe: Pipeline | FluxGenerator, networks: LoadedNetworks,
                 default_muls: list[float], saver: ImageSaver, upscaler: object | None = None):
        self.args, self.pipe, self.networks, self.default_muls, self.saver = args, pipe, networks, default_muls, saver
        self.hires = None
        if args.highres_fix_scale:
            self.hires = HiresSettings(args.highres_fix_scale, args.highres_fix_steps, args.highres_fix_strength,
                                       args.highres_fix_latents_upscaling, args.highres_fix_disable_control_net,
                                       upscaler)
        self.paths: list[str] = []
        self.progress = LineProgress()

    def run_batch(self, batch: list[Request]) -> None:
        """Set the batch's network multipliers, generate, save (hires: prefixes 0/1). spec §7, §8, §9."""
        if self.networks.networks:
            self.networks.set_multipliers(batch[0].network_muls, self.default_muls)
        specs, settings = [r.spec for r in batch], batch[0].settings
        if self.hires is None:
            self.paths += self.saver.save(batch, self.pipe.generate(specs, settings))
        else:
            first, final = self.pipe.generate_hires(specs, settings, self.hires)
            if self.args.highres_fix_save_1st:
                self.paths += self.saver.save(batch, first, hires_prefix(True, first_stage=True))
            self.paths += self.saver.save(batch, final, hires_prefix(True, first_stage=False))
        self.progress.written(batch)

    def run_requests(self, requests: Iterable[Request]) -> None:
        for batch in batches(requests, self.args.batch_size):
            self.run_batch(batch)


def _stdin_lines() -> Iterator[str]:
    """`--interactive`: prompt lines from stdin until EOF (no preview window: OpenCV is not a dependency)."""
    while True:
        print("Type prompt:", file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def _load_prompter(args: argparse.Namespace, pipe: Pipeline, networks: LoadedNetworks) -> Callable:
    """`--from_module FILE`: `get_prompter(args, pipe, networks)` returns the prompter. spec §1.2."""
    if not os.path.isfile(args.from_module):
        raise UserError(f"--from_module {args.from_module}: file not found")
    spec = importlib.util.spec_from_file_location("gen_img_prompter", args.from_module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_prompter"):
        raise UserError(f"--from_module {args.from_module}: defines no get_prompter(args, pipe, networks)")
    return module.get_prompter(args, pipe, networks.networks)


def prompt_lines(args: argparse.Namespace, image_count: int,
                 flux_name: str | None = None) -> tuple[list[str] | None, bool]:
    """Fixed prompt lines (checked now, before loading models) and whether they come from the init images."""
    if args.interactive or args.from_module:
        return None, False
    if args.from_file:
        lines = read_prompt_file(args.from_file)
    elif args.prompt is not None:
        lines = [args.prompt]
    elif image_count:
        return None, True
    else:
        raise UserError("no prompt: give --prompt, --from_file, --from_module or --interactive (or --image_path "
                        "with PNGs that carry a prompt)")
    for line in lines:
        check_line_supported(line, args, flux_name)
    return lines, False


def model_family(args: argparse.Namespace) -> str | None:
    """"dev" / "schnell" for a FLUX.1 `--ckpt` (options checked against it), None for SD. A missing `--ckpt` is
    reported after the prompt checks, as before FLUX existed, unless FLUX.1 options say what it should be."""
    defaults = gen_defaults()
    try:
        path = resolve_ckpt(args.ckpt)
    except UserError:
        if any(getattr(args, n) != getattr(defaults, n) for n in FLUX_ONLY):
            raise
        return None
    return flux_model_name(args, defaults, path)


def run(args: argparse.Namespace) -> list[str]:
    """gen_img.py: check options, load, then generate every requested image; returns the written paths."""
    # 1. options and inputs (errors before any model is loaded)
    reject_unsupported(args)
    make_scheduler(args.sampler, args.v_parameterization, for_training=False)  # unknown sampler -> list of names
    flux_name = model_family(args)
    init = load_init_images(args)
    lines, from_images = prompt_lines(args, len(init.images), flux_name)
    if from_images:
        lines = prompts_from_images(init.images)
    resolve_ckpt(args.ckpt)
    check_input_files(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    upscaler = None
    if args.highres_fix_upscaler and args.highres_fix_scale:  # without hires fix: warned in reject_unsupported
        # before the models: a missing or wrong weights file costs no model load
        upscaler = load_upscaler(args.highres_fix_upscaler, args.highres_fix_upscaler_args, model_dtype(args), device)
    if flux_name is not None:
        return _generate(args, *_flux_run(args, device, flux_name, from_images, lines), lines)
    # 2. models, networks, embeddings
    models = load_gen_models(args, device)
    set_attention(args, models)
    networks, default_muls = load_networks(args, models, device)
    pipe = Pipeline(models, device, clip_skip=args.clip_skip, max_embeddings_multiples=args.max_embeddings_multiples,
                    emb_normalize_mode=args.emb_normalize_mode, token_replacers=load_ti(args, models),
                    vae_batch_size=vae_batch_size(args.vae_batch_size, args.batch_size),
                    control_nets=load_control_nets(resolve_control_nets(args), models, device),
                    lllites=load_lllites(resolve_lllites(args), models, device))
    pipe.regional = RegionalLoRA.from_args(args, networks.networks, models.unet)
    model_name = os.path.splitext(os.path.basename(os.path.normpath(args.ckpt)))[0]
    gen = GenRun(args, pipe, networks, default_muls, ImageSaver(args, model_name, models.is_sdxl), upscaler)
    builder = RequestBuilder(args, 1024 if models.is_sdxl else 512, len(networks.networks), init,
                             images_from_prompts=from_images, total_lines=len(lines) if lines is not None else None)
    return _generate(args, gen, builder, lines)


def _flux_run(args: argparse.Namespace, device: torch.device, flux_name: str, from_images: bool,
              lines: list[str] | None) -> tuple[GenRun, RequestBuilder]:
    """FLUX.1 models, networks (networks.lora_flux), generator, saver and request builder (txt2img only;
    default size 1024)."""
    models = load_gen_flux_models(args, device)
    networks, default_muls = load_networks(args, models, device)
    pipe = FluxGenerator(models, device, t5_max_length=t5_max_length(args.t5xxl_max_token_length, flux_name),
                         apply_t5_attn_mask=args.apply_t5_attn_mask,
                         vae_batch_size=vae_batch_size(args.vae_batch_size, args.batch_size))
    model_name = os.path.splitext(os.path.basename(os.path.normpath(args.ckpt)))[0]
    gen = GenRun(args, pipe, networks, default_muls, ImageSaver(args, model_name, sdxl=False))
    builder = RequestBuilder(args, 1024, len(networks.networks), InitImages(), images_from_prompts=from_images,
                             total_lines=len(lines) if lines is not None else None, flux_name=flux_name)
    return gen, builder


def _generate(args: argparse.Namespace, gen: GenRun, builder: RequestBuilder, lines: list[str] | None) -> list[str]:
    """3. generate every requested image; returns the written paths."""
    with torch.no_grad():
        if args.interactive or args.from_module:
            _run_lazy(args, gen, builder)
        else:
            _run_lines(args, gen, builder, lines)
    logger.info("done: %d image(s) in %s", len(gen.paths), args.outdir)
    return gen.paths


def _run_lines(args: argparse.Namespace, gen: GenRun, builder: RequestBuilder, lines: list[str]) -> None:
    """`--n_iter` passes over the prompt list (shuffled with `--shuffle_prompts`), batched across lines."""
    with tqdm(total=len(lines) * args.n_iter, desc="prompts") as bar:
        gen.progress = LineProgress(bar)
        for _ in range(args.n_iter):
            builder.start_iteration()
            order = list(enumerate(lines))
            if args.shuffle_prompts:
                builder.seed_random.shuffle(order)
            requests = itertools.chain.from_iterable(gen.progress.mark(builder.requests_for_line(line, i))
                                                     for i, line in order)
            gen.run_requests(requests)


def _run_lazy(args: argparse.Namespace, gen: GenRun, builder: RequestBuilder) -> None:
    """Interactive / `--from_module`: each line is generated before the next one is asked for."""
    if args.interactive:
        source: Iterable[str] = _stdin_lines()
    else:
        prompter = _load_prompter(args, gen.pipe, gen.networks)
        seed_random = random.Random(args.seed) if args.seed is not None else random.Random()

        def from_prompter() -> Iterator[str]:
            for prompt_index in itertools.count():
                line = prompter(args, gen.pipe, seed_random, builder.iter_seed, prompt_index, builder.count)
                if line is None:
                    return
                yield line
        source = from_prompter()
    builder.start_iteration()
    for prompt_index, line in enumerate(source):
        try:
            gen.run_requests(builder.requests_for_line(line, prompt_index))
        except UserError as e:
            if not args.interactive:
                raise
            logger.error("%s", e)  # a bad line in an interactive session should not end it
