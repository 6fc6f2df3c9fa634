"""Gradual Latent (sd-scripts gen_img `--gradual_latent_*`, prompt options `--glt/--glr/--gle/--gls/--glsn/--glus`).

spec generation §1.5, §2, §3. Euler-a only. Sampling starts on a latent `ratio` times the requested size (the start
latent is shrunk bicubically, then optionally sharpened); once the model timestep is below `timesteps`, every
`every_n_steps` steps the ratio grows by `ratio_step` (capped at 1) and that Euler-a step ends on the larger size:
its result is enlarged bicubically (and sharpened with the unsharp mask, if given) and the ancestral noise is drawn
at the new size and scaled by `s_noise`. Sizes below full are rounded down to multiples of 8 latent pixels, as
upstream, so the U-Net can halve them.

Deliberate differences from upstream (docs/gen_img.md): ratio 1 is the exact requested size (upstream rounds it down
to a multiple of 8 latent pixels too, so sizes not a multiple of 64 px came out smaller); a size rounding to 0 is 8
(upstream crashes); if the schedule has not reached ratio 1 by the last step, the last step enlarges to the full size
(upstream returns a smaller image); a line's options hold for that line only; other samplers and inpainting are
refused instead of ignored (upstream) or crashing (upstream, inpaint).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from library.errors import UserError
from library.sampling.deep_shrink import resize_to

logger = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = 650  # a prompt line's `--glr/--gle/...` without `--glt` and no `--gradual_latent_timesteps`
SAMPLERS = ("euler_a", "k_euler_a")
SIZE_MULTIPLE = 8  # latent pixels; sizes below full are rounded down to this


@dataclass(frozen=True)
class UnsharpMask:
    """`ksize,sigma,strength[,target_x]`: x + strength·(x − blur(x)); target_x 0 sharpens x_t instead of x_{t-1}."""

    ksize: int
    sigma: float
    strength: float
    target_x: bool = True

    def __post_init__(self) -> None:
        if self.ksize < 1 or self.ksize % 2 == 0:
            raise UserError(f"Gradual Latent unsharp kernel size must be odd and >= 1, got {self.ksize}")
        if not self.sigma > 0:
            raise UserError(f"Gradual Latent unsharp sigma must be > 0, got {self.sigma}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x - gaussian_blur(x, self.ksize, self.sigma)) * self.strength


def parse_unsharp(value: str | Sequence[float] | None) -> UnsharpMask | None:
    """`--gradual_latent_unsharp_params "3,0.5,0.5[,1]"` or a line's `--glus` list -> UnsharpMask (None: off)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else ",".join(f"{v:g}" for v in value)
    bad = UserError(f"Gradual Latent unsharp params must be ksize,sigma,strength[,target_x] "
                    f"(--gradual_latent_unsharp_params / --glus), got {text!r}")
    try:
        numbers = [float(v) for v in text.split(",")] if isinstance(value, str) else [float(v) for v in value]
    except ValueError:
        raise bad from None
    if len(numbers) not in (3, 4) or not all(map(math.isfinite, numbers)) or numbers[0] != int(numbers[0]):
        raise bad
    target_x = True
    if len(numbers) == 4:
        if numbers[3] not in (0, 1):
            raise bad
        target_x = bool(numbers[3])
    return UnsharpMask(int(numbers[0]), numbers[1], numbers[2], target_x)


@dataclass(frozen=True)
class GradualLatent:
    """One Gradual Latent setting (upstream defaults)."""

    timesteps: int = DEFAULT_TIMESTEPS  # grow only while the model timestep is below this
    ratio: float = 0.5
    ratio_step: float = 0.125
    every_n_steps: int = 3
    s_noise: float = 1.0
    unsharp: UnsharpMask | None = None

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise UserError(f"Gradual Latent ratio must be in (0, 1] (--gradual_latent_ratio / --glr), "
                            f"got {self.ratio}")
        if self.ratio < 1 and not self.ratio_step > 0:
            raise UserError(f"Gradual Latent ratio step must be > 0 (--gradual_latent_ratio_step / --gls), "
                            f"got {self.ratio_step}")
        if self.every_n_steps < 0:
            raise UserError(f"Gradual Latent every_n_steps must be >= 0 (--gradual_latent_every_n_steps / --gle), "
                            f"got {self.every_n_steps}")

    def start(self, latents: torch.Tensor) -> torch.Tensor:
        """The start latents shrunk by `ratio` (bicubic, output size floor(size·ratio)), then sharpened."""
        h, w = latents.shape[-2:]
        if int(h * self.ratio) < 1 or int(w * self.ratio) < 1:
            raise UserError(f"Gradual Latent ratio {self.ratio} makes the {h}x{w} latent empty")
        if self.ratio < 1:
            latents = resize_to(latents, scale=self.ratio)
        if self.unsharp is not None:
            _check_blur_fits(self.unsharp, latents.shape[-2:])
            latents = self.unsharp(latents)
        return latents

    def schedule(self, timesteps: Iterable[float], full: tuple[int, int]) -> list[tuple[int, int] | None]:
        """Per denoising step, the latent size its result is enlarged to (None: no resize). Upstream's rule.

        At step i (model timestep t): if t < timesteps, ratio < 1 and at least every_n_steps steps passed since the
        last growth (the first growth needs none), ratio = min(ratio + ratio_step, 1).
        """
        timesteps = [float(t) for t in timesteps]
        ratio, elapsed = self.ratio, None
        targets: list[tuple[int, int] | None] = []
        size = (int(full[0] * ratio), int(full[1] * ratio))
        for t in timesteps:
            target = None
            if t < self.timesteps and ratio < 1.0 and (elapsed is None or elapsed >= self.every_n_steps):
                ratio = min(ratio + self.ratio_step, 1.0)
                target = size = (grown_size(full[0], ratio), grown_size(full[1], ratio))
                elapsed = 0
            if elapsed is not None:
                elapsed += 1
            targets.append(target)
        if targets and size != tuple(full):
            logger.warning("Gradual Latent: ratio %.3g at the last step, not 1; the last step enlarges the latent "
                           "to the full size (use more steps or a higher --gradual_latent_timesteps)", ratio)
            targets[-1] = tuple(full)
        if self.unsharp is not None:
            for target in targets:
                if target is not None:
                    _check_blur_fits(self.unsharp, target)
        return targets


def grown_size(full: int, ratio: float) -> int:
    """Latent side at `ratio` (< 1: rounded down to a multiple of 8, at least 8 unless full is smaller)."""
    if ratio >= 1.0:
        return full
    return min(full, max(SIZE_MULTIPLE, int(full * ratio) // SIZE_MULTIPLE * SIZE_MULTIPLE))


def _check_blur_fits(unsharp: UnsharpMask, size: Sequence[int]) -> None:
    if unsharp.ksize // 2 >= min(size):
        raise UserError(f"Gradual Latent unsharp kernel size {unsharp.ksize} is too large for a "
                        f"{size[0]}x{size[1]} latent (ksize // 2 must be below its smaller side)")


def resolve_gradual_latent(timesteps: int | None, ratio: float, ratio_step: float, every_n_steps: int,
                           s_noise: float, unsharp_params: str | Sequence[float] | None,
                           line: dict[str, Any] | None = None) -> GradualLatent | None:
    """The setting of one prompt line: command-line values overridden by the line's `gradual_latent_*` options.

    Without line options Gradual Latent is on only when `timesteps` is given; any line option turns it on for
    that line, timesteps defaulting to the command line's or 650 (upstream's `args.gradual_latent_timesteps or 650`,
    except that 0 stays 0).
    """
    values: dict[str, Any] = {"timesteps": timesteps, "ratio": ratio, "ratio_step": ratio_step,
                              "every_n_steps": every_n_steps, "s_noise": s_noise, "unsharp_params": unsharp_params}
    given = {k[len("gradual_latent_"):]: v for k, v in (line or {}).items()
             if k.startswith("gradual_latent_") and v is not None}
    values.update(given)
    if values["timesteps"] is None:
        if not given:
            return None
        values["timesteps"] = DEFAULT_TIMESTEPS
    unsharp = parse_unsharp(values.pop("unsharp_params"))
    return GradualLatent(**values, unsharp=unsharp)


def check_usable(sampler: str, inpaint: bool) -> None:
    """Gradual Latent needs Euler-a and no inpainting mask (upstream ignores it / crashes)."""
    if sampler not in SAMPLERS:
        raise UserError(f"Gradual Latent works with --sampler euler_a / k_euler_a only, not {sampler!r}")
    if inpaint:
        raise UserError("Gradual Latent cannot be combined with inpainting (--mask_path)")


def gaussian_blur(x: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur of (B, C, H, W) with reflect padding (torchvision's `gaussian_blur`)."""
    half = (ksize - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, ksize) / sigma) ** 2)
    kernel1d = (pdf / pdf.sum()).to(x.device, x.dtype)
    channels = x.shape[1]
    pad = ksize // 2
    y = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, kernel1d.view(1, 1, 1, ksize).expand(channels, 1, 1, ksize), groups=channels)
    return F.conv2d(y, kernel1d.view(1, 1, ksize, 1).expand(channels, 1, ksize, 1), groups=channels)


class GradualLatentEulerAncestral(EulerAncestralDiscreteScheduler):
    """Diffusers' Euler-a whose step can end on a larger latent (`resize_target`, set before each step)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gradual_latent: GradualLatent | None = None
        self.resize_target: tuple[int, int] | None = None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        if self.resize_target is None or self.gradual_latent is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        size, gl = self.resize_target, self.gradual_latent
        sigma = self.sigmas[self.step_index]
        sigma_to = self.sigmas[self.step_index + 1]
        sample = sample.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            denoised = sample - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:
            raise ValueError(f"Gradual Latent: prediction type {self.config.prediction_type} is not supported")
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - denoised) / sigma
        dt = sigma_down - sigma
        if gl.unsharp is None or gl.unsharp.target_x:
            prev = resize_to(sample + derivative * dt, size)
            if gl.unsharp is not None:
                prev = gl.unsharp(prev)
        else:  # sharpen the enlarged x_t, then take the (enlarged) Euler step from it
            prev = gl.unsharp(resize_to(sample, size)) + resize_to(derivative, size) * dt
        noise = randn_tensor((*model_output.shape[:2], *size), dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev = (prev + noise * sigma_up * gl.s_noise).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)


def gradual_latent_scheduler(scheduler: Any, setting: GradualLatent) -> GradualLatentEulerAncestral:
    """The Euler-a `scheduler` (same config) able to enlarge the latent as `setting` says."""
    if not isinstance(scheduler, EulerAncestralDiscreteScheduler):
        raise UserError(f"Gradual Latent works with the Euler-a sampler only, not {type(scheduler).__name__}")
    # (not from_config: for a subclass Diffusers would drop the values it marks as defaults of the parent)
    gl_scheduler = GradualLatentEulerAncestral(**{k: v for k, v in scheduler.config.items() if not k.startswith("_")})
    gl_scheduler.gradual_latent = setting
    return gl_scheduler
