"""Deep Shrink (sd-scripts gen_img `--ds_*`, prompt options `--dsd1/--dst1/--dsd2/--dst2/--dsr`). spec §1.5, §3.

While the model timestep is high, the U-Net's hidden states are shrunk (bicubic, by `ratio`) before one chosen
block of the down path; on the way up, whenever the hidden states and the skip connection differ in size, the
hidden states are resized (bicubic) to the skip's size before they are concatenated, and before the output
layers to the input size. So the deep blocks see a smaller image early in sampling, which reduces repeated
subjects at sizes far above the training resolution.

Depth numbering is upstream's: SD1/SD2 count Diffusers' `down_blocks` (0 = the first down block, after
`conv_in`); SDXL counts the LDM `input_blocks` (0 = `conv_in`, then each resnet (+ attention) and each
downsampler in order). `deep_shrink_unet` patches a Diffusers `UNet2DConditionModel` for the duration of a
generation with forward pre-hooks and its own up-block forward, and restores it afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_DEPTH = 3  # a prompt line's `--dst1/--dsd2/...` without `--dsd1` and no `--ds_depth_1`


@dataclass(frozen=True)
class DeepShrink:
    """One Deep Shrink setting; `depth_2`/`timesteps_2` None mean upstream's -1 / 1000 (no second stage)."""

    depth_1: int
    timesteps_1: int = 650
    depth_2: int | None = None
    timesteps_2: int | None = None
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if not self.ratio > 0:
            raise UserError(f"Deep Shrink ratio must be > 0 (--ds_ratio / --dsr), got {self.ratio}")
        if self.depth_1 < 0:
            raise UserError(f"Deep Shrink depth must be >= 0 (--ds_depth_1 / --dsd1), got {self.depth_1}")

    def shrinks_at(self, depth: int, timestep: float) -> bool:
        """Whether the hidden states entering block `depth` are shrunk at model timestep `timestep`."""
        if depth == self.depth_1 and timestep >= self.timesteps_1:
            return True
        low = 1000 if self.timesteps_2 is None else self.timesteps_2
        return self.depth_2 is not None and depth == self.depth_2 and low <= timestep < self.timesteps_1


def resolve_deep_shrink(depth_1: int | None, timesteps_1: int, depth_2: int | None, timesteps_2: int | None,
                        ratio: float, line: dict[str, Any] | None = None) -> DeepShrink | None:
    """The setting of one prompt line: command-line values overridden by the line's `ds_*` options.

    Without line options Deep Shrink is on only when `depth_1` is given; any line option turns it on for that
    line, depth 1 defaulting to the command line's or 3 (upstream's `args.ds_depth_1 or 3`, except that
    `--ds_depth_1 0` stays 0).
    """
    values = {"depth_1": depth_1, "timesteps_1": timesteps_1, "depth_2": depth_2, "timesteps_2": timesteps_2,
              "ratio": ratio}
    given = {k[3:]: v for k, v in (line or {}).items() if k.startswith("ds_") and v is not None}
    values.update(given)
    if values["depth_1"] is None:
        if not given:
            return None
        values["depth_1"] = DEFAULT_DEPTH
    return DeepShrink(**values)


def resize_to(x: torch.Tensor, size: torch.Size | tuple[int, int] | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Bicubic resize to `size` or by `scale` (bf16 goes through float32, as upstream); same size: `x` itself."""
    if size is not None and tuple(x.shape[-2:]) == tuple(size):
        return x
    dtype = x.dtype
    y = x.float() if dtype == torch.bfloat16 else x
    y = F.interpolate(y, size=size, scale_factor=scale, mode="bicubic", align_corners=False)
    return y.to(dtype)


def down_path_modules(unet: nn.Module, sdxl: bool) -> list[nn.Module]:
    """The modules Deep Shrink depths index, in order (see the module docstring)."""
    if not sdxl:
        return list(unet.down_blocks)
    modules: list[nn.Module] = [unet.conv_in]
    for block in unet.down_blocks:
        modules += list(block.resnets)
        modules += list(block.downsamplers or [])
    return modules


def _with_first_input(args: tuple, kwargs: dict, fn: Any, name: str) -> tuple[tuple, dict]:
    """(args, kwargs) with the module's first input (positional, or keyword `name`) replaced by fn(input)."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, name: fn(kwargs[name])}


def _up_block_forward(block: nn.Module, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple,
                      temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                      cross_attention_kwargs: dict | None = None, upsample_size: Any = None,
                      attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                      **_: Any) -> torch.Tensor:
    """Diffusers' (CrossAttn)UpBlock2D forward (inference, no FreeU) with the hidden states resized to each skip."""
    skips = list(res_hidden_states_tuple)
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in zip(block.resnets, attentions):
        skip = skips.pop()
        hidden_states = resnet(torch.cat([resize_to(hidden_states, skip.shape[-2:]), skip], dim=1), temb)
        if attn is not None:
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                 encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
    for upsampler in block.upsamplers or []:
        hidden_states = upsampler(hidden_states, upsample_size)
    return hidden_states


SUPPORTED_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


@contextlib.contextmanager
def deep_shrink_unet(unet: nn.Module, setting: DeepShrink | None, sdxl: bool) -> Iterator[None]:
    """Patch `unet` (Diffusers UNet2DConditionModel) for Deep Shrink inside the block; a no-op for None."""
    if setting is None:
        yield
        return
    down = down_path_modules(unet, sdxl)
    for depth in (setting.depth_1, setting.depth_2):
        if depth is not None and depth >= len(down):
            logger.warning("Deep Shrink depth %d is past the U-Net's last down-path block (%d): it never applies",
                           depth, len(down) - 1)
    for block in unet.up_blocks:
        if type(block).__name__ not in SUPPORTED_UP_BLOCKS:
            raise UserError(f"Deep Shrink supports U-Nets with {'/'.join(SUPPORTED_UP_BLOCKS)} up blocks only, "
                            f"not {type(block).__name__}")
    call: dict[str, Any] = {}  # the current U-Net call: model timestep and input latent size

    def record_call(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = timestep.flatten()[0].item() if torch.is_tensor(timestep) else float(timestep)
        call.update(timestep=t, size=sample.shape[-2:])

    def shrink_checked(depth: int, x: torch.Tensor) -> torch.Tensor:
        # upstream dies inside F.interpolate here; name the options instead
        if any(int(n * setting.ratio) < 1 for n in x.shape[-2:]):
            raise UserError(f"Deep Shrink: the {tuple(x.shape[-2:])} feature map at depth {depth} would shrink to "
                            f"nothing with ratio {setting.ratio}; use a smaller depth (--ds_depth_* / --dsd*), "
                            f"a larger --ds_ratio / --dsr, or a larger image")
        return resize_to(x, scale=setting.ratio)

    def shrink(depth: int, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not setting.shrinks_at(depth, call["timestep"]):
            return None
        return _with_first_input(args, kwargs, functools.partial(shrink_checked, depth), "hidden_states")

    def restore_size(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _with_first_input(args, kwargs, functools.partial(resize_to, size=call["size"]), "input")

    handles = [unet.register_forward_pre_hook(record_call, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(functools.partial(shrink, depth), with_kwargs=True)
                for depth, m in enumerate(down)]
    out_layer = unet.conv_norm_out if unet.conv_norm_out is not None else unet.conv_out
    handles.append(out_layer.register_forward_pre_hook(restore_size, with_kwargs=True))
    for block in unet.up_blocks:
        block.forward = functools.partial(_up_block_forward, block)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for block in unet.up_blocks:
            del block.forward
