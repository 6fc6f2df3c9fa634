#!/usr/bin/env python
"""LoRA training step: ours vs a bare diffusers + peft reference, same model, batch and seed, one run.

    python bench/train_step.py [--family sd1] [--steps 20] [--batch 1] [--resolution 64] [--device cpu]
Each variant runs in its own process (peak RSS is per process); prints a table: s/step, images/s,
peak memory, and our/reference ratio. Model: the tiny test model unless --model points to a real one.
Both loops encode the same batch with the VAE every step: ours runs with its latent memo off
(``SDT_LATENT_MEMO_MB=0``), which would otherwise skip the encoder from the second step on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import peak_rss_mib  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _batch(args, models, torch):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    tok = models.tokenizers[0]
    ids = tok(["a photo of a sks shape"] * args.batch, padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    return images, ids


def run_ours(args) -> dict:
    import torch
    from accelerate import Accelerator

    from library.models.loading import load_models
    from library.training.objective.diffusion_step import DiffusionObjective, StepRandom
    from library.training.methods.network import NetworkMethod
    from library.training.settings import TextSettings
    from library.training.settings.from_options import objective_settings
    from networks.network_host import NetworkHost

    models = load_models(args.model)
    for m in (models.unet, models.vae, *models.text_encoders):
        m.requires_grad_(False)
    acc = Accelerator(cpu=args.device == "cpu")
    models.to(acc.device)
    host = NetworkHost("networks.lora")
    host.create(1.0, args.rank, args.rank, models.vae, models.text_encoders[0], models.unet)
    host.apply_to(models.text_encoders[0], models.unet, False, True)
    objective = objective_settings(argparse.Namespace(), "N")  # every loss / noise option at its default
    obj = DiffusionObjective.from_settings(objective, models.vae.config.scaling_factor)
    method = NetworkMethod(host, models, obj, TextSettings(), acc, torch.float32, True, False)
    opt = torch.optim.AdamW(host.network.parameters(), lr=1e-4)
    images, ids = _batch(args, models, torch)
    batch = {"images": images, "input_ids": ids[:, None], "loss_weights": torch.ones(args.batch)}
    return _time(lambda i: _step(method.loss(batch, StepRandom.for_step(0, i, 0, 0, acc.device)), opt), args)


def run_reference(args) -> dict:
    import torch
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from library.models.loading import load_models

    models = load_models(args.model)
    unet, vae, te = models.unet, models.vae, models.text_encoders[0]
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    images, ids = _batch(args, models, torch)
    gen = torch.Generator().manual_seed(0)

    def step(i):
        with torch.no_grad():
            lat = vae.encode(images).latent_dist.sample(generator=gen) * vae.config.scaling_factor
            ctx = te(ids)[0]
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 1000, (lat.shape[0],), generator=gen)
        pred = unet(sched.add_noise(lat, noise, t), t, ctx).sample
        return _step(torch.nn.functional.mse_loss(pred.float(), noise.float()), opt)

    return _time(step, args)


def _step(loss, opt):
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _time(step, args) -> dict:
    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    dt = (time.perf_counter() - t0) / args.steps
    return {"s_per_step": dt, "images_per_s": args.batch / dt,
            "peak_mib": peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model file/folder (default: tiny SD1 written to a temp dir)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_ours(args) if args.variant == "ours" else run_reference(args)))
        return
    if args.model is None:
        from tools.make_tiny_model import write_tiny_model

        args.model = str(write_tiny_model("sd1", tempfile.mkdtemp(), formats=("safetensors",))["safetensors"])
    rows = {}
    base = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch", str(args.batch), "--resolution", str(args.resolution), "--rank", str(args.rank),
            "--device", args.device]
    for variant in ("reference", "ours"):
        env = dict(os.environ, SDT_LATENT_MEMO_MB="0")
        out = subprocess.run(base + ["--variant", variant], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-2000:]}")
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"LoRA training step, {Path(args.model).name}, batch {args.batch}, {args.resolution}px, rank {args.rank}, "
          f"{args.device}, {args.steps} steps")
    print("| variant | s/step | images/s | peak RSS MiB |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['s_per_step']:.4f} | {r['images_per_s']:.2f} | {r['peak_mib']:.0f} |")
    print(f"ratio ours/reference (s/step): {rows['ours']['s_per_step'] / rows['reference']['s_per_step']:.3f}")


if __name__ == "__main__":
    main()
