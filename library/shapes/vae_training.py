"""Train the tiny SD1 ``AutoencoderKL`` on the shapes world, then normalise its latent scale.

Recipe (why each part is there):
- data: every shape and colour of the world (the new concept too: a VAE only has to copy pixels, and the
  LoRA demo must be able to decode a heart), drawn once, grouped by canvas size;
- random square crops: the model is fully convolutional, so 32 px crops teach the same local copying as
  whole images at a quarter of the cost (the 64 px level dominates the CPU time);
- loss: L1 + an L1 on image gradients (keeps corners and thin star points sharp) + a tiny KL (1e-6,
  as in SD's VAE: the latent stays nearly deterministic but bounded);
- AdamW with a linear warm-up and a cosine decay over a fixed number of steps (deterministic: a time
  limit only stops early, it never changes the schedule);
- afterwards the latent mean/std per channel is measured and folded into ``quant_conv`` /
  ``post_quant_conv``, so latents times SD1's 0.18215 have unit variance: the single-file loader and
  kohya's scripts both assume 0.18215 for SD1, and this makes that assumption true for our VAE.

Status: with 8 GroupNorm groups (4 channels per group) 4000 steps give PSNR 27.2 dB, colour 99.5%, shape
90% on unseen images (stars lose their points); with 32 groups on 32-64 channels colour never passed.
Measurements are in docs/demo.md.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from library.models.tiny import tiny_vae_config

from . import evaluate, world

logger = logging.getLogger(__name__)

SD1_SCALING = 0.18215


@dataclass
class VAETrainConfig:
    """Everything that decides the trained weights (same config + same seed = same result)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    crop: int = 32  # 0 = whole images
    kl_weight: float = 1e-6
    edge_weight: float = 0.5
    dataset_size: int = 3000
    seed: int = 0
    # GroupNorm with 1-2 channels per group (32 groups on 32-64 channels) is an instance norm: it erases
    # each channel's per-image mean, so absolute colour cannot pass; 8 groups of 4 channels (like real SD's
    # 128 channels / 32 groups) keep it. Group counts other than 32 are recorded in our LDM files' metadata.
    block_out_channels: tuple[int, ...] = (32, 32, 32, 32)
    norm_num_groups: int = 8
    layers_per_block: int = 1
    minutes: float | None = None  # stop early when the wall clock says so
    colors: Sequence[str] = field(default_factory=lambda: tuple(world.PALETTE))
    shapes: Sequence[str] = world.ALL_SHAPES


def vae_config(cfg: VAETrainConfig) -> dict:
    """The Diffusers config: the tiny SD1 VAE of ``library.models.tiny`` with the chosen channels."""
    return dict(tiny_vae_config("sd1"), block_out_channels=tuple(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                scaling_factor=SD1_SCALING)


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x 3 images (same size) -> float N x 3 x H x W in [-1, 1]."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_images(x: torch.Tensor) -> list[np.ndarray]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


def make_buckets(n: int, seed: int, colors: Sequence[str], shapes: Sequence[str]) -> list[torch.Tensor]:
    """``n`` world images as one tensor per canvas size."""
    by_size: dict[tuple[int, int], list[np.ndarray]] = {}
    for s in world.generate(n, seed=seed, colors=colors, shapes=shapes):
        by_size.setdefault(s.image.shape[:2], []).append(s.image)
    return [to_tensor(v) for _, v in sorted(by_size.items())]


def _batch(buckets: list[torch.Tensor], cfg: VAETrainConfig, g: torch.Generator) -> torch.Tensor:
    data = buckets[int(torch.randint(len(buckets), (1,), generator=g))]
    x = data[torch.randint(len(data), (cfg.batch_size,), generator=g)]
    if cfg.crop:
        h, w = x.shape[2:]
        top = int(torch.randint(h - cfg.crop + 1, (1,), generator=g))
        left = int(torch.randint(w - cfg.crop + 1, (1,), generator=g))
        x = x[:, :, top:top + cfg.crop, left:left + cfg.crop]
    if bool(torch.rand(1, generator=g) < 0.5):
        x = x.flip(3)
    return x


def edge_l1(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: penalises soft edges and lost corners."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(rec) - dx(x)).abs().mean() + (dy(rec) - dy(x)).abs().mean()


def vae_loss(vae, x: torch.Tensor, cfg: VAETrainConfig, g: torch.Generator) -> tuple[torch.Tensor, float]:
    """Training loss of one batch, and its reconstruction L1 (for the log)."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator=g)).sample
    l1 = (rec - x).abs().mean()
    loss = l1 + cfg.edge_weight * edge_l1(rec, x) + cfg.kl_weight * post.kl().mean()
    return loss, float(l1.detach())


def _lr_at(step: int, cfg: VAETrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_vae(cfg: VAETrainConfig, progress: Callable[[int, float], None] | None = None):
    """Train a fresh tiny VAE; returns ``(vae, history)`` where history holds the per-step L1."""
    from diffusers import AutoencoderKL  # start-up (diffusers: ~2 s)

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**vae_config(cfg))
    with torch.no_grad():
        # start nearly deterministic (sampling std ~0.05, not ~1): the decoder sees signal from step 0
        vae.quant_conv.bias[vae.config.latent_channels:] -= 6.0
    vae.train()
    buckets = make_buckets(cfg.dataset_size, cfg.seed, cfg.colors, cfg.shapes)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.seed)
    start, history = time.perf_counter(), []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss, l1 = vae_loss(vae, _batch(buckets, cfg, g), cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        history.append(l1)
        if progress:
            progress(step, l1)
        if cfg.minutes is not None and time.perf_counter() - start > cfg.minutes * 60:
            logger.warning("time limit of %.1f min reached after %d of %d steps", cfg.minutes, step + 1, cfg.steps)
            break
    vae.eval()
    return vae, history


# ---------------------------------------------------------------- latent scale

@torch.no_grad()
def latent_stats(vae, buckets: list[torch.Tensor], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of sampled latents over the images (as training will see them)."""
    g = torch.Generator().manual_seed(0)
    zs = [vae.encode(d[i:i + batch]).latent_dist.sample(generator=g) for d in buckets for i in range(0, len(d), batch)]
    flat = torch.cat([z.permute(1, 0, 2, 3).reshape(z.shape[1], -1) for z in zs], dim=1)
    return flat.mean(1), flat.std(1)


@torch.no_grad()
def fold_latent_scale(vae, mean: torch.Tensor, std: torch.Tensor, scaling: float = SD1_SCALING) -> None:
    """Re-parametrise so new latents are ``(z - mean) / std / scaling`` per channel, exactly:
    the encoder's ``quant_conv`` emits the new mean/log-variance and ``post_quant_conv`` undoes it,
    so reconstructions do not change and ``latents * scaling`` has zero mean and unit variance."""
    k = 1.0 / (std * scaling)  # new = k * (old - mean)
    c = len(k)
    qc, pq = vae.quant_conv, vae.post_quant_conv
    qc.weight[:c] *= k.view(-1, 1, 1, 1)
    qc.bias[:c] = (qc.bias[:c] - mean) * k
    qc.bias[c:] += 2 * torch.log(k)  # log-variance scales with k^2
    # decoder: post_quant_conv(old) = W (new / k + mean) + b
    pq.bias += (pq.weight[:, :, 0, 0] @ mean)
    pq.weight /= k.view(1, -1, 1, 1)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def reconstruct(vae, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Encode (posterior mean) and decode same-size uint8 images."""
    x = to_tensor(images)
    return to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * math.log10(255 ** 2 / max(mse, 1e-10))


def evaluate_vae(vae, n: int = 200, seed: int = 10_001, colors: Sequence[str] = world.BASE_COLORS,
                 shapes: Sequence[str] = evaluate.EVAL_SHAPES) -> dict:
    """PSNR and evaluator accuracy on reconstructions of ``n`` unseen world images."""
    samples = list(world.generate(n, seed=seed, colors=colors, shapes=shapes))
    psnrs, color_ok, shape_ok = [], 0, 0
    for i in range(0, n, 50):
        chunk = samples[i:i + 50]
        for size in {s.image.shape for s in chunk}:
            group = [s for s in chunk if s.image.shape == size]
            for s, rec in zip(group, reconstruct(vae, [s.image for s in group])):
                psnrs.append(psnr(s.image, rec))
                p = evaluate.predict(rec, colors=colors, shapes=shapes)
                color_ok += p.color == s.color
                shape_ok += p.shape == s.shape
    return {"n": n, "psnr": float(np.mean(psnrs)), "color_accuracy": color_ok / n, "shape_accuracy": shape_ok / n}
