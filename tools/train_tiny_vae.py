#!/usr/bin/env python
"""Train the tiny SD1 AutoencoderKL on the 'shapes' world (CPU, minutes) and save it as a Diffusers folder.

    python tools/train_tiny_vae.py --out models/shapes_vae
    -> models/shapes_vae/config.json + diffusion_pytorch_model.safetensors  (AutoencoderKL.from_pretrained)
       models/shapes_vae/training_report.json  (command, settings, time, PSNR, evaluator accuracy)

The latent scale is then normalised: by default the measured per-channel mean/std is folded into the
model so that SD1's fixed factor 0.18215 gives unit-variance latents (the single-file loader and kohya's
scripts assume 0.18215 for SD1). --scale own keeps the weights and writes scaling_factor = 1/std instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from library.shapes.vae_training import VAETrainConfig

    d = VAETrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output Diffusers VAE folder")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, AdamW (default {d.lr})")
    p.add_argument("--crop", type=int, default=d.crop, help=f"square training crops, 0 = whole images (default {d.crop})")
    p.add_argument("--kl_weight", type=float, default=d.kl_weight, help=f"KL loss weight (default {d.kl_weight})")
    p.add_argument("--edge_weight", type=float, default=d.edge_weight,
                   help=f"weight of the L1 on image gradients (default {d.edge_weight})")
    p.add_argument("--dataset_size", type=int, default=d.dataset_size,
                   help=f"world images drawn for training (default {d.dataset_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights, data and batches (default {d.seed})")
    p.add_argument("--channels", default=",".join(map(str, d.block_out_channels)),
                   help="block_out_channels, 4 levels, multiples of --norm_groups (default %(default)s)")
    p.add_argument("--norm_groups", type=int, default=d.norm_num_groups,
                   help=f"GroupNorm groups (default {d.norm_num_groups}; 4+ channels per group keep colour; "
                        "values other than 32 are recorded in our LDM files' metadata)")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is far faster on a busy machine, where "
                        "more threads than free cores make OpenMP spin)")
    p.add_argument("--eval_n", type=int, default=200, help="unseen images for PSNR/accuracy (default 200)")
    p.add_argument("--scale", choices=["fold", "own"], default="fold",
                   help="fold: normalise latents for SD1's 0.18215 (default); own: scaling_factor = 1/std")
    add_logging_arguments(p)
    return p


def config_from_args(args: argparse.Namespace):
    from library.shapes.vae_training import VAETrainConfig

    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise UserError(f"--channels {args.channels!r}: want a comma list of integers") from None
    if args.norm_groups < 1:
        raise UserError("--norm_groups must be at least 1")
    if len(channels) != 4 or any(c < 1 or c % args.norm_groups for c in channels):
        # four levels = 8x latents like SD
        raise UserError(f"--channels {args.channels!r}: want 4 levels, each a multiple of --norm_groups "
                        f"{args.norm_groups}")
    for name in ("steps", "batch_size", "dataset_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.crop and (args.crop % 8 or args.crop < 16 or args.crop > 48):
        raise UserError(f"--crop {args.crop}: want 0 or a multiple of 8 between 16 and 48 (the smallest canvas)")
    return VAETrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, crop=args.crop,
                          kl_weight=args.kl_weight, edge_weight=args.edge_weight, dataset_size=args.dataset_size,
                          seed=args.seed, block_out_channels=channels, norm_num_groups=args.norm_groups,
                          minutes=args.minutes)


def train_and_save(cfg, out: str, scale: str = "fold", eval_n: int = 200, command: str = "") -> dict:
    """Train, normalise the latent scale, evaluate, save; returns the report."""
    from tqdm import tqdm

    from library.fileio import atomic_path
    from library.shapes import vae_training as vt

    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(total=cfg.steps, desc="training VAE")

    def progress(step: int, l1: float) -> None:
        bar.update(1)
        bar.set_postfix(l1=f"{l1:.4f}", refresh=False)

    vae, history = vt.train_vae(cfg, progress)
    bar.close()
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    mean, std = vt.latent_stats(vae, vt.make_buckets(400, cfg.seed + 1, cfg.colors, cfg.shapes))
    if scale == "fold":
        vt.fold_latent_scale(vae, mean, std)
    else:
        vae.register_to_config(scaling_factor=float(1.0 / std.pow(2).mean().sqrt()))
    metrics = vt.evaluate_vae(vae, n=eval_n) if eval_n else {}
    n_params = sum(p.numel() for p in vae.parameters())
    report = {"command": command, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in vars(cfg).items()},
              "steps_done": len(history), "train_seconds": round(train_s, 1),
              "train_cpu_seconds": round(cpu_s, 1),
              "final_l1": float(sum(history[-50:]) / len(history[-50:])),
              "raw_latent_mean": mean.tolist(), "raw_latent_std": std.tolist(), "scale": scale,
              "scaling_factor": vae.config.scaling_factor, "parameters": n_params, **metrics}
    with atomic_path(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "training_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    cfg = config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "python tools/train_tiny_vae.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = train_and_save(cfg, args.out, args.scale, args.eval_n, command)
    print(f"saved {args.out}: {report['steps_done']} steps in {report['train_seconds']:.0f} s, "
          f"{report['parameters']:,} parameters, scaling_factor {report['scaling_factor']:.5f}")
    if args.eval_n:
        print(f"reconstructions of {report['n']} unseen images: PSNR {report['psnr']:.2f} dB, "
              f"colour {report['color_accuracy']:.1%}, shape {report['shape_accuracy']:.1%}")
    return report


if __name__ == "__main__":
    main()
