"""Our denoising pipeline: txt2img, img2img, inpaint, CFG, negative scale, SDXL size cond, hires fix,
Deep Shrink, Gradual Latent, ControlNet, ControlNet-LLLite.

spec generation §2, §6, §7. The loop is ours (no diffusers pipeline class); Diffusers schedulers do the
stepping. A run reads as: per-image generators -> start noise -> (init latents) -> conditioning branches ->
timesteps -> `denoise` -> decode.

Reproducible noise (spec §2): every image has its own CPU `torch.Generator` seeded with its seed. Draw order:
the start noise (txt2img start latent, or the img2img/inpaint noise), then the img2img VAE latent sample, then
every step noise: ancestral schedulers get the list of generators as `generator=` and diffusers' `randn_tensor`
draws row i from generator i. So an image depends only on its seed, not on its batch position or batch size.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from library.errors import UserError
from library.models.bundle import SDModels
from library.sampling.controlnet import ControlNetBatch, LoadedControlNet
from library.sampling.controlnet_lllite import ControlNetLLLite, LLLiteBatch
from library.sampling.deep_shrink import DeepShrink, deep_shrink_unet
from library.sampling.gradual_latent import GradualLatent, check_usable, gradual_latent_scheduler
from library.sampling.img2img import (decode_latents, encode_images, mask_to_latent_keep, round_down, tensor_to_images,
                                      upscale_images, upscale_latents, vae_scale_factor)
from library.sampling.samplers import make_scheduler
from library.sampling.text_encoding import PromptEmbeddings, encode_for_training_samples, encode_prompts
from library.sampling.upscaler import run_upscaler

logger = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.8


@dataclass
class GenSettings:
    """Settings shared by every image of one U-Net batch (batches split where these differ)."""

    width: int
    height: int
    steps: int = 50
    scale: float = 7.5
    negative_scale: float | None = None
    strength: float | None = None  # img2img strength; None -> 0.8 when there are init images
    sampler: str = "ddim"
    deep_shrink: DeepShrink | None = None
    gradual_latent: GradualLatent | None = None
    guidance_scale: float | None = None  # FLUX.1 dev's distilled guidance (`--guidance_scale`, line `--g`)


@dataclass
class ImageSpec:
    """One image to generate: prompt, seed and optional init image / mask / SDXL size conditioning."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    control_images: tuple[Image.Image, ...] | None = None  # ControlNet hints, one per `Pipeline.control_nets`


@dataclass
class HiresSettings:
    """`--highres_fix_*` (spec §7)."""

    scale: float
    steps: int = 28
    strength: float | None = None  # 1st stage strength (img2img only)
    latents_upscaling: bool = False
    disable_control_net: bool = False  # `--highres_fix_disable_control_net`: none in the 2nd stage
    upscaler: Any = None  # `--highres_fix_upscaler` plug-in (library/sampling/upscaler.py); replaces the resize


@dataclass
class Branches:
    """U-Net conditioning of all guidance branches stacked on the batch axis: [negative, positive, empty]."""

    context: torch.Tensor
    count: int
    added_cond: dict[str, torch.Tensor] | None = None


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image (CPU, so the same seed gives the same image on any device)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def draw_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Row i from generator i: the first draw of every image's noise stream. spec §2."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]).to(device)


def guide(pred: torch.Tensor, count: int, scale: float, negative_scale: float | None) -> torch.Tensor:
    """CFG: ε_u + s(ε_c − ε_u); with negative scale n: ε_0 + s(ε_c − ε_0) − n(ε_neg − ε_0). spec §6.

    The negative-scale form is gen_img_diffusers' (gen_img crashes on it, spec pitfall 4); ε_0 is the empty prompt.
    """
    if count == 1:
        return pred
    if count == 2:
        uncond, cond = pred.chunk(2)
        return uncond + scale * (cond - uncond)
    neg, cond, empty = pred.chunk(3)
    return empty + scale * (cond - empty) - negative_scale * (neg - empty)


def add_noise_at(scheduler: Any, original: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """`scheduler.add_noise` at exactly `timestep`, whatever the scheduler's step counter says.

    Diffusers' k-schedulers use their begin/step index instead of the given timestep once those are set;
    the inpaint blend needs the noise level of a specific timestep, so the counters are hidden for the call.
    """
    saved = {k: getattr(scheduler, k) for k in ("_begin_index", "_step_index") if hasattr(scheduler, k)}
    for k in saved:
        setattr(scheduler, k, None)
    try:
        return scheduler.add_noise(original, noise, timestep.reshape(1))
    finally:
        for k, v in saved.items():
            setattr(scheduler, k, v)


def img2img_start(scheduler: Any, steps: int, strength: float) -> tuple[int, int]:
    """(index of the noising timestep, index of the first denoising timestep). spec §7.

    `init_timestep = min(int(steps·strength) + steps_offset, steps)`; noise at `timesteps[-init_timestep]`,
    denoise from `t_start = max(steps − init_timestep + offset, 0)` (with gen_img's steps_offset 1 the first
    denoised timestep is one after the noising one, as upstream). Indices scale by the scheduler order.
    """
    offset = scheduler.config.get("steps_offset", 0)
    init_timestep = min(int(steps * strength) + offset, steps)
    t_start = max(steps - init_timestep + offset, 0)
    order = scheduler.order
    return (steps - init_timestep) * order, t_start * order


class Pipeline:
    """Runs SD1/SD2/SDXL generation on loaded models; one instance per run (gen_img or training samples)."""

    def __init__(self, models: SDModels, device: torch.device | str = "cpu", *, clip_skip: int | None = None,
                 max_embeddings_multiples: int | None = None, emb_normalize_mode: str = "original",
                 token_replacers: Sequence[Any] | None = None, vae_batch_size: float | None = None,
                 for_training: bool = False, autocast_dtype: torch.dtype | None = None, progress: bool = True,
                 v_parameterization: bool | None = None,
                 control_nets: Sequence[LoadedControlNet] | None = None,
                 lllites: Sequence[ControlNetLLLite] | None = None):
        self.models = models
        self.control_nets = list(control_nets or [])
        self.lllites = list(lllites or [])  # ControlNet-LLLite, hooked into the U-Net (SDXL)
        self.v_parameterization = models.v_parameterization if v_parameterization is None else v_parameterization
        self.device = torch.device(device)
        self.clip_skip = clip_skip
        self.max_embeddings_multiples = max_embeddings_multiples
        self.emb_normalize_mode = emb_normalize_mode
        self.token_replacers = token_replacers
        self.vae_batch_size = vae_batch_size
        self.for_training = for_training
        self.autocast_dtype = autocast_dtype
        self.progress = progress
        self.regional: Any = None  # library.sampling.regional.RegionalLoRA: gen_img's regional LoRA

    # ------------------------------------------------------------ conditioning

    def encode(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """Encode prompts together (one chunk count), gen_img's or the training samples' encoder. spec §5."""
        m = self.models
        if self.for_training:
            return encode_for_training_samples(m.family, m.text_encoders, m.tokenizers, prompts, self.clip_skip,
                                               self.token_replacers)
        return encode_prompts(m.family, m.text_encoders, m.tokenizers, prompts, clip_skip=self.clip_skip,
                              max_embeddings_multiples=self.max_embeddings_multiples,
                              emb_normalize_mode=self.emb_normalize_mode, token_replacers=self.token_replacers)

    def branches(self, specs: Sequence[ImageSpec], settings: GenSettings) -> Branches:
        """Conditioning of [negative, positive(, empty)] for CFG; positive only when scale <= 1. spec §6."""
        if self.regional is not None:  # the positive context then holds every image's sub-prompts
            context, added = self.regional.conditioning(self, specs, settings)
            return Branches(context, 2, added)
        b = len(specs)
        cfg = settings.scale > 1.0
        with_empty = cfg and settings.negative_scale is not None
        prompts = [s.prompt for s in specs]
        if cfg:
            prompts = [s.negative_prompt or "" for s in specs] + prompts + ([""] * b if with_empty else [])
        count = len(prompts) // b
        emb = self.encode(prompts)
        dtype = self.unet_dtype
        added = None
        if self.models.is_sdxl:
            pos = self._time_ids(specs, settings, negative=False)
            neg = self._time_ids(specs, settings, negative=True)
            time_ids = torch.cat([neg, pos] + ([neg] if with_empty else [])) if cfg else pos
            added = {"text_embeds": emb.pooled.to(self.device, dtype), "time_ids": time_ids.to(self.device, dtype)}
        return Branches(emb.context.to(self.device, dtype), count, added)

    @staticmethod
    def _time_ids(specs: Sequence[ImageSpec], settings: GenSettings, negative: bool) -> torch.Tensor:
        """SDXL `[orig_h, orig_w, crop_top, crop_left, H, W]`; defaults orig = target, crop 0. spec §6."""
        rows = []
        for s in specs:
            oh = s.original_height or settings.height
            ow = s.original_width or settings.width
            if negative:
                oh = s.original_height_negative or oh
                ow = s.original_width_negative or ow
            rows.append([oh, ow, s.crop_top or 0, s.crop_left or 0, settings.height, settings.width])
        return torch.tensor(rows, dtype=torch.float32)

    @property
    def unet_dtype(self) -> torch.dtype:
        """The dtype the U-Net computes in: fp8-stored weights (--fp8_base) compute in their norms' dtype."""
        dtypes = [p.dtype for p in self.models.unet.parameters()]
        return next((d for d in dtypes if d.itemsize > 1), dtypes[0])

    # ------------------------------------------------------------ the loop

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None or self.autocast_dtype == self.unet_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, scheduler: Any, branches: Branches,
                settings: GenSettings, control: ControlNetBatch | LLLiteBatch | None = None, step: int = 0,
                n_steps: int = 1) -> torch.Tensor:
        """One guided U-Net prediction (ε or v) for the current latents (step `step` of `n_steps`)."""
        x = scheduler.scale_model_input(latents, t)
        x = torch.cat([x] * branches.count).to(self.unet_dtype)
        with self._autocast():
            extra = {} if control is None else control.residuals(step, n_steps, x, t, branches.context,
                                                                 branches.count)
            out = self.models.unet(x, t, encoder_hidden_states=branches.context,
                                   added_cond_kwargs=branches.added_cond, **extra).sample
        return guide(out.float(), branches.count, settings.scale, settings.negative_scale)

    def denoise(self, latents: torch.Tensor, scheduler: Any, timesteps: torch.Tensor, branches: Branches,
                settings: GenSettings, generators: list[torch.Generator],
                inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                resize_targets: Sequence[tuple[int, int] | None] | None = None,
                control: ControlNetBatch | LLLiteBatch | None = None) -> torch.Tensor:
        """Scheduler steps over `timesteps`; inpaint re-imposes the kept region after every step. spec §7.

        `inpaint = (init latents, noise, keep weights m)`: after step j the kept region is the init latents noised
        to the next timestep (exactly the init latents after the last step). `resize_targets` (Gradual Latent):
        the latent size step j ends on, or None. `control`: the batch's ControlNets and hints.
        """
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for j, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not self.progress)):
            pred = self.predict(latents, t, scheduler, branches, settings, control, j, len(timesteps))
            if resize_targets is not None:
                scheduler.resize_target = resize_targets[j]
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
            if inpaint is not None:
                init, noise, keep = inpaint
                target = init if j + 1 == len(timesteps) else add_noise_at(scheduler, init, noise, timesteps[j + 1])
                latents = target * keep + latents * (1 - keep)
        return latents

    @torch.no_grad()
    def generate_latents(self, specs: Sequence[ImageSpec], settings: GenSettings,
                         init_latents: torch.Tensor | None = None) -> torch.Tensor:
        """txt2img / img2img / inpaint for one batch; returns the final latents (B, C, H/f, W/f), f the VAE's factor."""
        # 1. one noise stream per image
        generators = make_generators([s.seed for s in specs])
        vae, f = self.models.vae, vae_scale_factor(self.models.vae)
        shape = (vae.config.latent_channels, settings.height // f, settings.width // f)
        noise = draw_noise(generators, shape, self.device)
        # 2. init latents of img2img (images encoded with each image's generator, after the start noise)
        if init_latents is None and specs[0].init_image is not None:
            init_latents = encode_images(self.models.vae, [s.init_image for s in specs], generators, self.device)
        # 3. conditioning and scheduler
        branches = self.branches(specs, settings)
        scheduler = make_scheduler(settings.sampler, self.v_parameterization, self.for_training)
        gradual = settings.gradual_latent
        if gradual is not None:
            check_usable(settings.sampler, inpaint=specs[0].mask is not None)
            scheduler = gradual_latent_scheduler(scheduler, gradual)
        scheduler.set_timesteps(settings.steps, device=self.device)
        timesteps = scheduler.timesteps
        # 4. start latents
        if init_latents is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            strength = DEFAULT_STRENGTH if settings.strength is None else settings.strength
            noise_index, start = img2img_start(scheduler, settings.steps, strength)
            if start >= len(timesteps):
                return init_latents  # strength 0: nothing to denoise
            latents = add_noise_at(scheduler, init_latents, noise, timesteps[noise_index])
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            timesteps = timesteps[start:]
        inpaint = None
        if specs[0].mask is not None:
            keep = mask_to_latent_keep([s.mask for s in specs], settings.width, settings.height, f,
                                       vae.config.latent_channels).to(self.device)
            inpaint = (init_latents, noise, keep)
        resize_targets = None
        if gradual is not None:  # start small, grow during denoising
            resize_targets = gradual.schedule(timesteps, tuple(latents.shape[-2:]))
            latents = gradual.start(latents)
        control = self._control_batch(specs, settings)
        # 5. denoise
        try:
            with deep_shrink_unet(self.models.unet, settings.deep_shrink, self.models.is_sdxl):
                return self.denoise(latents, scheduler, timesteps, branches, settings, generators, inpaint,
                                    resize_targets, control)
        finally:
            if isinstance(control, LLLiteBatch):
                control.close()  # the hooks stay inactive outside this batch

    def _control_batch(self, specs: Sequence[ImageSpec], settings: GenSettings) -> ControlNetBatch | LLLiteBatch | None:
        """The batch's ControlNets (or LLLites) with its hint images; None when it has none (or none is loaded)."""
        if specs[0].control_images is None:
            return None
        if self.lllites:
            if not self.models.is_sdxl:
                raise UserError("ControlNet-LLLite is supported for SDXL models only")
            if settings.deep_shrink is not None:
                raise UserError("ControlNet-LLLite and Deep Shrink cannot be combined (the shrunk U-Net does not fit "
                                "the LLLite hint grids)")
            return LLLiteBatch(self.lllites, [s.control_images for s in specs])
        if not self.control_nets:
            return None
        if self.models.is_sdxl:
            raise UserError("ControlNet is supported for SD1/SD2 models only, not SDXL")
        if settings.deep_shrink is not None:
            raise UserError("ControlNet and Deep Shrink cannot be combined (the shrunk U-Net does not fit the "
                            "ControlNet's residuals)")
        return ControlNetBatch(self.control_nets, [s.control_images for s in specs])

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> PIL images (`--vae_batch_size` latents per VAE call)."""
        return tensor_to_images(decode_latents(self.models.vae, latents, self.vae_batch_size))

    def generate(self, specs: Sequence[ImageSpec], settings: GenSettings) -> list[Image.Image]:
        """One batch to images."""
        return self.decode(self.generate_latents(specs, settings))

    # ------------------------------------------------------------ hires fix

    def generate_hires(self, specs: Sequence[ImageSpec], settings: GenSettings,
                       hires: HiresSettings) -> tuple[list[Image.Image], list[Image.Image]]:
        """Hires fix: 1st stage small, upscale (resize or `hires.upscaler`), img2img at full size with seed+1.

        Returns (1st, final). spec §7."""
        w1 = round_down(round(settings.width * hires.scale), 32)
        h1 = round_down(round(settings.height * hires.scale), 32)
        first_settings = replace(settings, width=w1, height=h1, steps=hires.steps,
                                 strength=hires.strength if hires.strength is not None else settings.strength)
        first_specs = [replace(s, init_image=_resized(s.init_image, w1, h1), mask=_resized(s.mask, w1, h1))
                       for s in specs]
        latents1 = self.generate_latents(first_specs, first_settings)
        first_images = self.decode(latents1)
        second_specs = [replace(s, seed=s.seed + 1) for s in specs]
        if hires.disable_control_net:
            second_specs = [replace(s, control_images=None) for s in second_specs]
        strength = DEFAULT_STRENGTH if settings.strength is None else settings.strength
        second_settings = replace(settings, strength=strength)
        if hires.upscaler is not None:
            ups, init = run_upscaler(hires.upscaler, self.models.vae, first_images, latents1, self.unet_dtype,
                                     settings.width, settings.height, self.vae_batch_size)
            if init is not None:
                second_specs = [replace(s, init_image=None) for s in second_specs]
                latents2 = self.generate_latents(second_specs, second_settings, init_latents=init.to(self.device))
            else:
                second_specs = [replace(s, init_image=im) for s, im in zip(second_specs, ups)]
                latents2 = self.generate_latents(second_specs, second_settings)
        elif hires.latents_upscaling:
            init = upscale_latents(latents1, settings.width, settings.height, vae_scale_factor(self.models.vae))
            second_specs = [replace(s, init_image=None) for s in second_specs]
            latents2 = self.generate_latents(second_specs, second_settings, init_latents=init)
        else:
            ups = upscale_images(first_images, settings.width, settings.height)
            second_specs = [replace(s, init_image=im) for s, im in zip(second_specs, ups)]
            latents2 = self.generate_latents(second_specs, second_settings)
        return first_images, self.decode(latents2)


def _resized(image: Image.Image | None, width: int, height: int) -> Image.Image | None:
    if image is None or image.size == (width, height):
        return image
    return image.resize((width, height), Image.LANCZOS)


__all__ = ["GenSettings", "ImageSpec", "HiresSettings", "Pipeline", "guide", "img2img_start", "make_generators"]
