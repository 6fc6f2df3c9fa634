"""ControlNet-LLLite for SDXL (gen_img `--control_net_lllite_models/_multipliers/_ratios/_preps`, `--guide_image_path`).

spec generation §1.5. An LLLite file holds one small module per targeted U-Net Linear layer, named
`lllite_unet_<LDM path with _>` (upstream's defaults: the `to_q/to_k/to_v` of `attn1` and the `to_q` of `attn2` in
every transformer block of the input blocks and the middle block; never the output blocks). Each module has

* `conditioning1.{0,2[,4]}`: convs (kernel = stride, no padding, ReLU between) mapping the hint image, RGB in
  [-1, 1] at the image size, to a (cond_emb, h, w) map at the token grid of its block; computed once per hint;
* `down.0` (Linear + ReLU), `mid.0` (Linear + ReLU on `cat([cond_emb, down(x)])`), `up.0` (Linear).

The targeted layer then computes `org(x + up(mid(cat(cond, down(x)))) * multiplier)`. Several LLLites chain as
upstream's `apply_to` does: the last loaded sees the plain input, the one before it sees the input already shifted.
At step i an LLLite is active while `i / steps <= its ratio`; the hint is repeated for every guidance branch.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from library.errors import UserError
from library.models.checkpoint_io import CheckpointReader
from library.sampling.controlnet import hint_model_settings, make_hint, pick
from networks.lora_targets import unet_targets

logger = logging.getLogger(__name__)

PREFIX = "lllite_unet"
_TARGET = re.compile(r"^lllite_unet_(input_blocks|middle_block)_.*_(attn1_to_[qkv]|attn2_to_q)$")


@dataclass(frozen=True)
class LLLiteOption:
    """One `--control_net_lllite_models` entry with its prep, ratio and multiplier."""

    path: str
    canny: tuple[int, int] | None = None
    ratio: float = 1.0
    multiplier: float = 1.0


def resolve_lllites(args: argparse.Namespace) -> list[LLLiteOption]:
    """Check the LLLite options (before any model is loaded); [] when ControlNet-LLLite is off."""
    models = args.control_net_lllite_models or []
    if args.control_net_multipliers and len(args.control_net_multipliers) > len(models):
        raise UserError(f"--control_net_multipliers has {len(args.control_net_multipliers)} value(s) but "
                        f"--control_net_lllite_models has {len(models)}")
    if not models:
        return []
    if args.control_net_models:
        raise UserError("--control_net_models and --control_net_lllite_models cannot be used together")
    for name in ("control_net_preps", "control_net_ratios"):
        values = getattr(args, name)
        if values and len(values) > len(models):
            raise UserError(f"--{name} has {len(values)} value(s) but --control_net_lllite_models has {len(models)}")
    if args.control_net_weights:
        raise UserError("--control_net_weights is for ControlNet; ControlNet-LLLite uses --control_net_multipliers")
    if args.v1 or args.v2:
        raise UserError("ControlNet-LLLite is supported for SDXL models only")
    if not args.guide_image_path:
        raise UserError("--control_net_lllite_models needs hint images: give --guide_image_path")
    return [LLLiteOption(path, canny, ratio, pick(args.control_net_multipliers, i, 1.0))
            for i, (path, canny, ratio) in enumerate(hint_model_settings(args, "control_net_lllite_models",
                                                                         os.path.isfile))]


# ------------------------------------------------------------------ targets and weights


def lllite_targets(unet: torch.nn.Module) -> dict[str, tuple[torch.nn.Linear, int]]:
    """LLLite module name -> (targeted Linear, downscale of its token grid vs. the image), in U-Net order."""
    paths = {id(m): name for name, m in unet.named_modules()}
    levels = len(unet.config["block_out_channels"])
    out = {}
    for t in unet_targets(unet, include_conv=False):
        name = PREFIX + t.lora_name[len("lora_unet"):]
        if not _TARGET.match(name):
            continue
        path = paths[id(t.module)]
        m = re.match(r"down_blocks\.(\d+)\.", path)
        level = int(m.group(1)) if m else levels - 1  # the middle block is at the lowest resolution
        out[name] = (t.module, 8 * 2 ** level)
    return out


@dataclass
class LLLiteModule:
    """The tensors of one LLLite module (upstream's `conditioning1`, `down`, `mid`, `up`)."""

    convs: list[tuple[torch.Tensor, torch.Tensor]]
    down: tuple[torch.Tensor, torch.Tensor]
    mid: tuple[torch.Tensor, torch.Tensor]
    up: tuple[torch.Tensor, torch.Tensor]

    def embed(self, hint: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) hint in [-1, 1] -> (B, tokens, cond_emb)."""
        x = hint
        for i, (w, b) in enumerate(self.convs):
            x = F.conv2d(x, w, b, stride=w.shape[-1])
            if i + 1 < len(self.convs):
                x = F.relu(x)
        return x.flatten(2).transpose(1, 2)

    def delta(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(x, *self.down))
        h = F.relu(F.linear(torch.cat([cond, h], dim=2), *self.mid))
        return F.linear(h, *self.up)


def _module_from(name: str, sd: dict[str, torch.Tensor], linear: torch.nn.Linear, factor: int,
                 path: str) -> LLLiteModule:
    def pair(part):
        w, b = sd.get(f"{name}.{part}.weight"), sd.get(f"{name}.{part}.bias")
        if w is None or b is None:
            raise UserError(f"--control_net_lllite_models {path}: {name}.{part} is missing")
        return w, b

    conv_re = re.compile(re.escape(name) + r"\.conditioning1\.(\d+)\.weight$")
    conv_ids = sorted({int(m.group(1)) for k in sd if (m := conv_re.match(k))})
    module = LLLiteModule([pair(f"conditioning1.{i}") for i in conv_ids], pair("down.0"), pair("mid.0"), pair("up.0"))
    stride = 1
    for w, _ in module.convs:
        stride *= w.shape[-1]
    mlp, cond = module.down[0].shape[0], module.convs[-1][0].shape[0] if module.convs else -1
    ok = (module.convs and module.convs[0][0].shape[1] == 3 and stride == factor
          and module.down[0].shape == (mlp, linear.in_features) and module.mid[0].shape == (mlp, mlp + cond)
          and module.up[0].shape == (linear.in_features, mlp))
    if not ok:
        raise UserError(f"--control_net_lllite_models {path}: module {name} does not fit this U-Net (shapes)")
    return module


class ControlNetLLLite:
    """One loaded LLLite file, hooked into the U-Net's Linear layers (inactive until `cond` is set)."""

    def __init__(self, option: LLLiteOption, unet: torch.nn.Module, sd: dict[str, torch.Tensor]):
        self.option = option
        targets = lllite_targets(unet)
        names = sorted({k.split(".", 1)[0] for k in sd})
        unknown = [n for n in names if n not in targets]
        if unknown:
            raise UserError(f"--control_net_lllite_models {option.path}: module {unknown[0]} is not in this U-Net "
                            f"({len(unknown)} unmatched; not a ControlNet-LLLite file for SDXL?)")
        missing = [n for n in targets if n not in names]
        if missing:
            raise UserError(f"--control_net_lllite_models {option.path}: module {missing[0]} is missing "
                            f"({len(missing)} of {len(targets)} U-Net layers have no LLLite module)")
        self.modules = {n: _module_from(n, sd, lin, factor, option.path) for n, (lin, factor) in targets.items()}
        self.cond: dict[str, torch.Tensor] | None = None
        # prepend: a later LLLite's hook runs first, as upstream's apply_to wraps the earlier one's forward
        self._handles = [lin.register_forward_pre_hook(self._hook(n), prepend=True)
                         for n, (lin, _) in targets.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            if self.cond is None or self.option.multiplier == 0.0:
                return None
            x, cond = args[0], self.cond[name]
            if cond.shape[:2] != x.shape[:2]:
                raise UserError(f"ControlNet-LLLite: hint grid {tuple(cond.shape[:2])} does not fit the U-Net's "
                                f"{tuple(x.shape[:2])} (image width and height must be multiples of 32)")
            return (x + self.modules[name].delta(x, cond) * self.option.multiplier,) + tuple(args[1:])
        return hook

    def embed(self, hint: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: m.embed(hint) for n, m in self.modules.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def load_lllite(option: LLLiteOption, unet: torch.nn.Module, device: torch.device | str = "cpu") -> ControlNetLLLite:
    dtype = next(unet.parameters()).dtype
    sd = {k: v.to(device, dtype) for k, v in CheckpointReader(option.path).items()}
    return ControlNetLLLite(option, unet, sd)


def load_lllites(options: Sequence[LLLiteOption], models, device: torch.device | str) -> list[ControlNetLLLite]:
    """Load and hook every `--control_net_lllite_models` entry into the model's U-Net."""
    if options and not models.is_sdxl:
        raise UserError("ControlNet-LLLite is supported for SDXL models only (this model is SD1/SD2)")
    loaded = []
    for o in options:
        logger.info("ControlNet-LLLite: %s (prep %s, ratio %s, multiplier %s)", o.path,
                    "canny_%d_%d" % o.canny if o.canny else "none", o.ratio, o.multiplier)
        loaded.append(load_lllite(o, models.unet, device))
    return loaded


# ------------------------------------------------------------------ per batch


@dataclass
class LLLiteBatch:
    """The LLLites of one batch with its hint images (images[b][n]: row b's hint for LLLite n)."""

    nets: list[ControlNetLLLite]
    images: Sequence[Sequence[Image.Image]]
    _embs: dict[tuple[int, int, int, int], dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        if any(len(row) != len(self.nets) for row in self.images):
            raise UserError(f"each image needs {len(self.nets)} guide image(s), one per ControlNet-LLLite")

    def _emb(self, n: int, height: int, width: int, branches: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (n, height, width, branches)  # per size: Gradual Latent changes it
        if key not in self._embs:
            canny = self.nets[n].option.canny
            hint = torch.cat([make_hint(row[n], canny, width, height) for row in self.images]) * 2.0 - 1.0
            emb = self.nets[n].embed(hint.to(like.device, like.dtype))
            self._embs[key] = {k: torch.cat([v] * branches) for k, v in emb.items()}
        return self._embs[key]

    def residuals(self, step: int, n_steps: int, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  branches: int) -> dict[str, object]:
        """Set each LLLite's conditioning for this step (None past its ratio); no U-Net keyword arguments."""
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        for n, net in enumerate(self.nets):
            net.cond = self._emb(n, h, w, branches, x) if step / n_steps <= net.option.ratio else None
        return {}

    def close(self) -> None:
        for net in self.nets:
            net.cond = None
