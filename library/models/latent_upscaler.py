"""sd-scripts' latent upscaler (v0.8.7 `tools/latent_upscaler.py`): a residual CNN that refines the VAE latents of
a LANCZOS-enlarged image, with upstream's module names, so its weight files load unchanged.

Layout (state-dict names): `conv1` (4 -> 128, 3x3, no bias) + `bn1`; `resblock1` ... `resblock20`, each `conv1`/`bn1`/
`conv2`/`bn2` at 128 channels, a skip over every 4 blocks; `conv2` (128 -> 64) + `bn2`, `conv3` (64 -> 64) + `bn3`;
`conv_final` (64 -> 4, 1x1, with bias); the output is added to the input (the network predicts a correction).
`tools/latent_upscaler.py` is the front that gen_img's `--highres_fix_upscaler` imports; this module holds the model.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from library.errors import UserError

from .checkpoint_io import CheckpointReader

logger = logging.getLogger(__name__)

WIDTH, LAST_WIDTH, LATENT_CHANNELS = 128, 64, 4
RESBLOCKS, BLOCKS_PER_SKIP = 20, 4
# BatchNorm's counter: written by torch.save of a trained model, never read in eval mode
_OPTIONAL_SUFFIX = ".num_batches_tracked"


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the input, then relu (upstream's ResidualBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + x)


class Upscaler(nn.Module):
    """The latent refiner; `upscale` is the hires-fix plug-in call (library/sampling/upscaler.py's contract)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(LATENT_CHANNELS, WIDTH, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTH)
        for i in range(1, RESBLOCKS + 1):
            self.add_module(f"resblock{i}", ResidualBlock(WIDTH))
        self.conv2 = nn.Conv2d(WIDTH, LAST_WIDTH, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(LAST_WIDTH)
        self.conv3 = nn.Conv2d(LAST_WIDTH, LAST_WIDTH, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(LAST_WIDTH)
        self.conv_final = nn.Conv2d(LAST_WIDTH, LATENT_CHANNELS, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x
        x = torch.relu(self.bn1(self.conv1(x)))
        for start in range(1, RESBLOCKS + 1, BLOCKS_PER_SKIP):
            residual = x
            for i in range(start, start + BLOCKS_PER_SKIP):
                x = getattr(self, f"resblock{i}")(x)
            x = x + residual
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))  # no relu here (upstream)
        return self.conv_final(x) + inp

    def support_latents(self) -> bool:
        """It works on images: the 1st stage's decoded images are enlarged with LANCZOS, then encoded."""
        return False

    @torch.no_grad()
    def upscale(self, vae: nn.Module, lowreso_images: Sequence[Image.Image] | None,
                lowreso_latents: torch.Tensor | None, dtype: torch.dtype, width: int, height: int,
                batch_size: int = 1, vae_batch_size: int = 1) -> torch.Tensor:
        """Images -> LANCZOS to width x height -> VAE latents -> refined, times the VAE's scaling factor."""
        if lowreso_images is None:
            raise ValueError("the latent upscaler needs the 1st-stage images (support_latents() is False)")
        pixels = images_to_pixels(lowreso_images, width, height).to(dtype)
        latents = torch.cat([encode_mean(vae, pixels[i:i + vae_batch_size])
                             for i in tqdm(range(0, len(pixels), vae_batch_size), desc="encode", leave=False)])
        param = next(self.parameters())
        refined = torch.cat([self(latents[i:i + batch_size].to(param.device, param.dtype))
                             for i in range(0, len(latents), batch_size)])
        return refined * vae.config.scaling_factor


def images_to_pixels(images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
    """PIL images, each LANCZOS-resized to width x height -> (B, 3, H, W) in [-1, 1] (upstream's x / 127.5 - 1)."""
    arrays = [np.asarray(im.convert("RGB").resize((width, height), Image.LANCZOS), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def encode_mean(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Unscaled latents: the mean of the VAE's posterior. Upstream draws a sample from the global RNG; the mean
    (the sample's centre; the posterior's spread is tiny) keeps a seeded gen_img run reproducible."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict name of the model and its shape."""
    return {k: tuple(v.shape) for k, v in Upscaler().state_dict().items()}


def read_upscaler_weights(path: str, option: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (.safetensors, or a weights-only .pt/.ckpt), checked name by name and shape by
    shape against the model; any difference is one line naming the file."""
    try:
        reader = CheckpointReader(path)
    except UserError as e:  # no such file, not a checkpoint: the same words, led by the option
        raise UserError(f"{option}{e}") from None
    try:
        shapes = {k: reader.shape(k) for k in reader.keys()}
        want = expected_shapes()
        missing = [k for k in want if k not in shapes and not k.endswith(_OPTIONAL_SUFFIX)]
        unexpected = [k for k in shapes if k not in want]
        wrong = [f"{k} {shapes[k]} (expected {want[k]})" for k in want if k in shapes and shapes[k] != want[k]]
        if missing or unexpected or wrong:
            found = [f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
                     f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})" if unexpected else "",
                     f"wrong shapes: {', '.join(wrong[:3])}" if wrong else ""]
            raise UserError(f"{option}{path}: not latent upscaler weights: "
                            f"{'; '.join(f for f in found if f)}")
        return {k: reader.get(k, torch.float32) for k in shapes}
    finally:
        reader.close()


def load_upscaler_model(path: str, option: str = "weights=") -> Upscaler:
    """The model with the file's weights, in eval mode (the stored BatchNorm statistics; see docs)."""
    model = Upscaler()
    logger.info("loading latent upscaler weights from %s", path)
    model.load_state_dict(read_upscaler_weights(path, option), strict=False)  # the names were checked above
    return model.eval()
