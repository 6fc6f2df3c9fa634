"""ControlNet v1.x for SD1/SD2 (gen_img `--control_net_models/_preps/_ratios/_weights`, `--guide_image_path`).

spec generation §1.4-1.5. A ControlNet is a trainable copy of the U-Net encoder that sees a hint image (edges,
depth, ...) and adds its per-level outputs ("residuals") to the U-Net's skip connections and middle block.

Files: an original (LDM) ControlNet file (`control_model.` + `input_blocks` / `middle_block` / `time_embed` like
the U-Net encoder, `zero_convs.N.0`, `input_hint_block.*`, `middle_block_out.0`; a "difference" file adds to the
base U-Net's encoder), a Diffusers `ControlNetModel` folder, or a Diffusers-keyed `.safetensors`. Everything is
loaded into Diffusers' `ControlNetModel`; the config comes from tensor shapes, GroupNorm groups and attention
heads from the model's U-Net.

Semantics follow upstream's gen_img: guide images are grouped per image (ControlNet count per group) and cycled
over the images; each hint is fed as RGB in [0, 1] to every guidance branch; at denoising step i ControlNet
`i % n` is used (several ControlNets alternate, they are not summed) while `i / steps <= its ratio`, its
residuals multiplied by its weight.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from library.errors import UserError
from library.models.checkpoint_io import CheckpointReader
from library.models.key_rules import KeyRule, check_bijective
from library.models.unet_keys import unet_rules

logger = logging.getLogger(__name__)

LDM_PREFIX = "control_model."
UNPREFIXED_LDM = ("input_hint_block.", "zero_convs.")  # an LDM ControlNet without `control_model.`
CANNY_DEFAULT = (63, 191)  # upstream's `canny` thresholds
CV2_MISSING = ("--control_net_preps canny needs OpenCV: pip install opencv-python, or pass ready-made hint "
               "images with --control_net_preps none")


# ------------------------------------------------------------------ options


@dataclass(frozen=True)
class ControlNetOption:
    """One `--control_net_models` entry with its prep (None or (low, high) Canny thresholds), ratio and weight."""

    path: str
    canny: tuple[int, int] | None = None
    ratio: float = 1.0
    weight: float = 1.0


def parse_prep(text: str | None) -> tuple[int, int] | None:
    """`none` -> None; `canny`, `canny_<low>`, `canny_<low>_<high>` -> thresholds (upstream's 63/191 defaults)."""
    if text is None or text.lower() == "none":
        return None
    parts = text.split("_")
    if parts[0] != "canny" or len(parts) > 3:
        raise UserError(f"--control_net_preps {text}: unknown preprocess (use none or canny_<low>_<high>)")
    try:
        values = [int(p) for p in parts[1:]]
    except ValueError:
        raise UserError(f"--control_net_preps {text}: Canny thresholds must be integers") from None
    low, high = values + list(CANNY_DEFAULT)[len(values):]
    return low, high


def _cv2():
    try:
        import cv2  # noqa: PLC0415  (optional package)
    except ImportError:
        return None
    return cv2


def resolve_control_nets(args: argparse.Namespace) -> list[ControlNetOption]:
    """Check the ControlNet options (before any model is loaded); [] when ControlNet is off.

    As upstream, `--control_net_preps/_ratios/_weights` shorter than `--control_net_models` leave the rest at
    none / 1.0 / 1.0; longer lists, or any of them without models, are errors.
    """
    models = args.control_net_models or []
    if getattr(args, "control_net_lllite_models", None):
        return []  # ControlNet-LLLite: controlnet_lllite.resolve_lllites checks these options
    for name in ("control_net_preps", "control_net_ratios", "control_net_weights"):
        values = getattr(args, name)
        if values and len(values) > len(models):
            raise UserError(f"--{name} has {len(values)} value(s) but --control_net_models has {len(models)}")
    if not models:
        if args.guide_image_path:
            raise UserError("--guide_image_path without --control_net_models or --control_net_lllite_models: guide "
                            "images are used by ControlNet (-LLLite) only (CLIP / VGG16 guidance is not supported "
                            "yet); see docs/gen_img.md")
        return []
    if args.sdxl:
        raise UserError("ControlNet is supported for SD1/SD2 models only (for SDXL use --control_net_lllite_models; "
                        "SDXL ControlNets are not supported yet)")
    if not args.guide_image_path:
        raise UserError("--control_net_models needs hint images: give --guide_image_path")
    return [ControlNetOption(path, canny, ratio, pick(args.control_net_weights, i, 1.0))
            for i, (path, canny, ratio) in enumerate(hint_model_settings(args, "control_net_models", os.path.exists))]


def pick(values: Sequence | None, i: int, default):
    """Entry i of a per-model option list, or the default where the list is missing or shorter (upstream)."""
    return values[i] if values and i < len(values) else default


def hint_model_settings(args: argparse.Namespace, option: str,
                        exists) -> list[tuple[str, tuple[int, int] | None, float]]:
    """(path, Canny thresholds or None, ratio) of each `--<option>` model from `--control_net_preps/_ratios`."""
    out = []
    for i, path in enumerate(getattr(args, option)):
        if not exists(path):
            raise UserError(f"--{option} {path}: no such file" + (" or folder" if exists is os.path.exists else ""))
        ratio = pick(args.control_net_ratios, i, 1.0)
        if ratio < 0:
            raise UserError(f"--control_net_ratios must be >= 0, got {ratio}")
        out.append((path, parse_prep(pick(args.control_net_preps, i, None)), ratio))
    if any(canny for _, canny, _ in out) and _cv2() is None:
        raise UserError(CV2_MISSING)
    return out


def guide_images_for(paths: Sequence[str], index: int, count: int) -> list[str]:
    """The `count` guide images (one per ControlNet) of the image with global index `index` (upstream's rule)."""
    groups = len(paths) // count
    if groups == 0:
        raise UserError(f"--guide_image_path gives {len(paths)} image(s) but {count} ControlNet(s) need one each")
    g = index % groups
    return list(paths[g * count:(g + 1) * count])


# ------------------------------------------------------------------ hints


def make_hint(image: Image.Image, canny: tuple[int, int] | None, width: int, height: int) -> torch.Tensor:
    """Guide image -> (1, 3, height, width) RGB hint in [0, 1]: resized (LANCZOS) to the image size, then Canny."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image)
    if canny is not None:
        cv2 = _cv2()
        if cv2 is None:
            raise UserError(CV2_MISSING)
        edges = cv2.Canny(cv2.cvtColor(array, cv2.COLOR_RGB2GRAY), canny[0], canny[1])
        array = np.repeat(edges[:, :, None], 3, axis=2)
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


# ------------------------------------------------------------------ weights


def ldm_levels(keys: Sequence[str]) -> tuple[int, int, list[bool]]:
    """(levels, layers per block, attention per level) of an LDM U-Net encoder (keys without prefix)."""
    keys = set(keys)
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    levels = len({int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}) + 1
    lpb = (len(blocks) - levels) // levels
    attn = [f"input_blocks.{(lpb + 1) * i + 1}.1.proj_in.weight" in keys for i in range(levels)]
    return levels, lpb, attn


def controlnet_rules(model_keys: Sequence[str], levels: int, lpb: int, attn: Sequence[bool],
                     linear_proj: bool, n_hint_convs: int) -> list[KeyRule]:
    """Diffusers `ControlNetModel` key <-> LDM ControlNet key (without `control_model.`), for every model key.

    The encoder reuses the U-Net table; `controlnet_down_blocks.N` = `zero_convs.N.0`, `controlnet_mid_block` =
    `middle_block_out.0`, and the hint embedding's convs are the even `input_hint_block` entries (SiLUs between).
    """
    unet_like = {"layers_per_block": lpb, "block_out_channels": [0] * levels,
                 "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                 "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                 "use_linear_projection": linear_proj}
    own = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
    rules = unet_rules([k for k in model_keys if not k.startswith(own)], unet_like)
    for k in model_keys:
        if k.startswith("controlnet_down_blocks."):
            n, rest = k[len("controlnet_down_blocks."):].split(".", 1)
            rules.append(KeyRule((k,), f"zero_convs.{n}.0.{rest}"))
        elif k.startswith("controlnet_mid_block."):
            rules.append(KeyRule((k,), "middle_block_out.0." + k[len("controlnet_mid_block."):]))
        elif k.startswith("controlnet_cond_embedding."):
            part, rest = k[len("controlnet_cond_embedding."):].rsplit(".", 1)
            if part == "conv_in":
                conv = 0
            elif part == "conv_out":
                conv = n_hint_convs - 1
            else:
                conv = int(part.split(".")[1]) + 1
            rules.append(KeyRule((k,), f"input_hint_block.{2 * conv}.{rest}"))
    check_bijective(rules)
    return rules


def infer_config(shapes: Mapping[str, tuple], unet_config: Mapping) -> dict:
    """Diffusers `ControlNetModel` config from Diffusers-keyed shapes; norm groups / heads from the U-Net's config."""
    levels = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("down_blocks."))
    lpb = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("down_blocks.0.resnets."))
    channels = [shapes[f"down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(levels)]
    attn = [f"down_blocks.{i}.attentions.0.proj_in.weight" in shapes for i in range(levels)]
    depth = [len({k.split(".")[5] for k in shapes if k.startswith(f"down_blocks.{i}.attentions.0.transformer_blocks.")})
             for i in range(levels)]
    n_blocks = len({k.split(".")[2] for k in shapes if k.startswith("controlnet_cond_embedding.blocks.")})
    cond = [shapes["controlnet_cond_embedding.conv_in.weight"][0]]
    cond += [shapes[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"][0] for i in range(n_blocks // 2)]
    to_k = next(k for k in shapes if k.endswith("attn2.to_k.weight"))
    proj = next(k for k in shapes if k.endswith("proj_in.weight"))
    same_shape = list(unet_config["block_out_channels"]) == channels
    heads = unet_config["attention_head_dim"] if same_shape else (
        8 if len(shapes[proj]) == 4 else [max(1, c // 64) for c in channels])
    return {
        "in_channels": shapes["conv_in.weight"][1],
        "conditioning_channels": shapes["controlnet_cond_embedding.conv_in.weight"][1],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "block_out_channels": channels, "layers_per_block": lpb,
        "cross_attention_dim": shapes[to_k][1], "attention_head_dim": heads,
        "transformer_layers_per_block": [max(1, d) for d in depth] if len(set(depth) - {0}) > 1 else 1,
        "use_linear_projection": len(shapes[proj]) == 2,
        "norm_num_groups": unet_config.get("norm_num_groups", 32) if same_shape else 32,
        "upcast_attention": bool(unet_config.get("upcast_attention", False)) if same_shape else False,
        "conditioning_embedding_out_channels": cond,
    }


def _ldm_to_diffusers(ldm: dict[str, torch.Tensor], path: str, option: str) -> dict[str, torch.Tensor]:
    """LDM ControlNet tensors (prefix removed) -> Diffusers `ControlNetModel` keys, by the rule table."""
    levels, lpb, attn = ldm_levels(list(ldm))
    if levels < 2 or lpb < 1:
        raise UserError(f"{option} {path}: no ControlNet encoder (input_blocks) found")
    n_hint = len({k.split(".")[1] for k in ldm if k.startswith("input_hint_block.") and k.endswith(".weight")})
    proj = next((k for k in ldm if k.endswith("proj_in.weight")), None)
    linear = proj is not None and ldm[proj].ndim == 2
    keys = _model_keys(levels, lpb, attn, n_hint, ldm)
    rules = controlnet_rules(keys, levels, lpb, attn, linear, n_hint)
    out = {}
    for r in rules:
        if r.ldm_key in ldm:
            out[r.model_keys[0]] = r.to_model(ldm[r.ldm_key])[0]
    return out


def _model_keys(levels: int, lpb: int, attn: Sequence[bool], n_hint: int, ldm: Mapping[str, torch.Tensor]) -> list[str]:
    """The Diffusers key names of a ControlNet of this layout (built on the meta device: no memory)."""
    from diffusers import ControlNetModel  # start-up (diffusers: ~2 s)

    depth = [len({k.split(".")[4] for k in ldm if k.startswith(f"input_blocks.{(lpb + 1) * i + 1}.1.transformer_blocks.")})
             for i in range(levels)]
    with torch.device("meta"):
        model = ControlNetModel(
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            block_out_channels=[ldm[f"input_blocks.{(lpb + 1) * i + 1}.0.out_layers.3.weight"].shape[0]
                                for i in range(levels)],
            layers_per_block=lpb, norm_num_groups=1, cross_attention_dim=8,
            attention_head_dim=1, transformer_layers_per_block=[max(1, d) for d in depth],
            conditioning_embedding_out_channels=[8] * (n_hint // 2))
    return list(model.state_dict())


def load_control_net(path: str, unet: torch.nn.Module, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None, option: str = "--control_net_models"):
    """One ControlNet (LDM file, Diffusers folder or Diffusers-keyed file) as Diffusers' `ControlNetModel`.

    LDM files come with the `control_model.` prefix (released ControlNets) or without it (what sd-scripts'
    train_controlnet.py writes). `option` names the file in messages."""
    from diffusers import ControlNetModel  # start-up (diffusers: ~2 s)

    dtype = dtype or next(unet.parameters()).dtype
    if os.path.isdir(path):
        try:
            model = ControlNetModel.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"{option} {path}: not a Diffusers ControlNet folder ({e})") from None
        return model.to(device).eval().requires_grad_(False)
    tensors = dict(CheckpointReader(path).items())
    difference = "difference" in tensors
    tensors.pop("difference", None)
    if any(k.startswith(LDM_PREFIX) for k in tensors):
        ldm = {k[len(LDM_PREFIX):]: v for k, v in tensors.items() if k.startswith(LDM_PREFIX)}
        sd = _ldm_to_diffusers(ldm, path, option)
    elif any(k.startswith(UNPREFIXED_LDM) for k in tensors):
        sd = _ldm_to_diffusers(tensors, path, option)
    elif any(k.startswith("controlnet_cond_embedding.") for k in tensors):
        sd = tensors
    else:
        raise UserError(f"{option} {path}: not a ControlNet file (no control_model.*, input_hint_block.* or "
                        f"controlnet_cond_embedding.* tensors)")
    if difference:  # Transfer Control: the file holds control - base for the encoder
        base = unet.state_dict()
        for k, v in base.items():
            if not k.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")):
                sd[k] = v.float() + sd[k].float() if k in sd else v.clone()
    try:
        config = infer_config({k: tuple(v.shape) for k, v in sd.items()}, unet.config)
    except (KeyError, StopIteration, ValueError) as e:
        raise UserError(f"{option} {path}: unexpected ControlNet layout ({e!r})") from None
    model = ControlNetModel(**config)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{option} {path}: tensors do not fit the inferred ControlNet "
                        f"({' '.join(str(e).split())[:400]})") from None
    return model.to(device, dtype).eval().requires_grad_(False)


def control_net_to_ldm(model) -> dict[str, torch.Tensor]:
    """A Diffusers `ControlNetModel` as an LDM ControlNet state dict (`control_model.` keys)."""
    sd = model.state_dict()
    cfg = model.config
    attn = ["CrossAttn" in t for t in cfg.down_block_types]
    n_hint = 2 * len(cfg.conditioning_embedding_out_channels)
    rules = controlnet_rules(list(sd), len(attn), cfg.layers_per_block, attn, cfg.use_linear_projection, n_hint)
    return {LDM_PREFIX + r.ldm_key: r.to_ldm([sd[k] for k in r.model_keys]) for r in rules}


# ------------------------------------------------------------------ per generation


@dataclass
class LoadedControlNet:
    model: torch.nn.Module
    option: ControlNetOption


def load_control_nets(options: Sequence[ControlNetOption], models, device: torch.device | str) -> list[LoadedControlNet]:
    """Load every `--control_net_models` entry next to the model's U-Net (same device and dtype)."""
    if options and models.is_sdxl:
        raise UserError("ControlNet is supported for SD1/SD2 models only (this model is SDXL); for SDXL use "
                        "--control_net_lllite_models (SDXL ControlNets are not supported yet)")
    loaded = []
    for o in options:
        logger.info("ControlNet: %s (prep %s, ratio %s, weight %s)", o.path,
                    "canny_%d_%d" % o.canny if o.canny else "none", o.ratio, o.weight)
        loaded.append(LoadedControlNet(load_control_net(o.path, models.unet, device), o))
    return loaded


class ControlNetBatch:
    """The ControlNets of one batch with its hint images; gives each step's U-Net residuals."""

    def __init__(self, nets: Sequence[LoadedControlNet], images: Sequence[Sequence[Image.Image]]):
        if any(len(row) != len(nets) for row in images):
            raise UserError(f"each image needs {len(nets)} guide image(s), one per ControlNet")
        self.nets = list(nets)
        self.images = images  # images[b][n]: the hint of batch row b for ControlNet n
        self._hints: dict[tuple[int, int, int, int], torch.Tensor] = {}

    def hint(self, n: int, height: int, width: int, branches: int) -> torch.Tensor:
        """(branches·B, 3, height, width) hints of ControlNet n on its device and dtype, the same hints for every
        guidance branch (cached per size: Gradual Latent changes it)."""
        key = (n, height, width, branches)
        if key not in self._hints:
            net = self.nets[n]
            param = next(net.model.parameters())
            hint = torch.cat([make_hint(row[n], net.option.canny, width, height) for row in self.images])
            self._hints[key] = torch.cat([hint.to(param.device, param.dtype)] * branches)
        return self._hints[key]

    def residuals(self, step: int, n_steps: int, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  branches: int) -> dict[str, object]:
        """U-Net keyword arguments adding the active ControlNet's weighted residuals ({} when none is active):
        ControlNet `step % n` while `step / n_steps <= its ratio` (upstream's alternation and ratio rule)."""
        n = step % len(self.nets)
        net = self.nets[n]
        if step / n_steps > net.option.ratio:
            return {}
        # the hint's size is set by the ControlNet's own embedding (one stride-2 conv per level after the first),
        # not by the VAE: 8 for real ControlNets, whatever the checkpoint's VAE downsamples by
        f = 2 ** (len(net.model.config.conditioning_embedding_out_channels) - 1)
        hint = self.hint(n, x.shape[-2] * f, x.shape[-1] * f, branches)
        down, mid = net.model(x, t, encoder_hidden_states=context, controlnet_cond=hint,
                              conditioning_scale=net.option.weight, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
