#!/usr/bin/env python
"""Peak memory and time to load a real-size checkpoint: ours vs diffusers' from_single_file, one run.

    python bench/load_memory.py [--family sd1] [--dtype fp16] [--work /tmp/sdt-load-bench]
Writes a real-size random-weight model (SD1.5 layout, saved in --dtype) once, then loads it in a fresh
process per loader and reports wall time and peak RSS against the size of the weights. A loader that
holds the file's tensors and the model's at once peaks near 2x; ours should stay near 1x.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import peak_rss_mib  # noqa: E402

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _real_models(family: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.bundle import SDModels
    from library.models.tokenizers import load_tokenizers

    assert family == "sd1", "only the SD1.5 layout is generated here"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8, sample_size=64)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768))
    return SDModels(family, unet, vae, [te], load_tokenizers(family))


def prepare(args) -> tuple[Path, Path]:
    import torch

    from library.models.saving import save_diffusers, save_ldm_checkpoint

    work = Path(args.work)
    ckpt, cfg = work / f"{args.family}-{args.dtype}.safetensors", work / f"{args.family}-config"
    if ckpt.exists() and cfg.exists():
        return ckpt, cfg
    work.mkdir(parents=True, exist_ok=True)
    models = _real_models(args.family)
    save_ldm_checkpoint(models, str(ckpt), dtype=getattr(torch, DTYPES[args.dtype]))
    # configs only (diffusers' from_single_file needs a local config folder offline)
    save_diffusers(models, str(cfg), dtype=torch.float16)
    for sub in ("unet", "vae", "text_encoder"):
        for f in (cfg / sub).glob("*.safetensors"):
            f.unlink()
    return ckpt, cfg


def load(args) -> dict:
    import torch

    dtype = getattr(torch, DTYPES[args.load_dtype or args.dtype])
    t0 = time.perf_counter()
    if args.loader == "ours":
        from library.models.loading import load_models

        m = load_models(args.ckpt, dtype=dtype)
        n = sum(p.numel() * p.element_size() for mod in (m.unet, m.vae, *m.text_encoders) for p in mod.parameters())
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(args.ckpt, config=args.config, local_files_only=True,
                                                        torch_dtype=dtype)
        n = sum(p.numel() * p.element_size() for mod in (pipe.unet, pipe.vae, pipe.text_encoder)
                for p in mod.parameters())
        m = pipe
    seconds = time.perf_counter() - t0
    # read every weight once: memory-mapped tensors only become resident when touched
    with torch.no_grad():
        for mod in (m.unet, m.vae, *(getattr(m, "text_encoders", None) or [m.text_encoder])):
            for p in mod.parameters():
                p.float().sum()
    return {"seconds": seconds, "peak_mib": peak_rss_mib(),
            "weights_mib": n / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sd1")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="file dtype")
    p.add_argument("--load_dtype", default=None, choices=sorted(DTYPES), help="load dtype (default: --dtype)")
    p.add_argument("--work", default="/tmp/sdt-load-bench")
    p.add_argument("--loader", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loader:
        print(json.dumps(load(args)))
        return
    ckpt, cfg = prepare(args)
    rows = {}
    for loader in ("diffusers", "ours"):
        cmd = [sys.executable, __file__, "--loader", loader, "--ckpt", str(ckpt), "--config", str(cfg),
               "--dtype", args.dtype, "--load_dtype", args.load_dtype or args.dtype]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            sys.exit(f"{loader} failed:\n{r.stderr[-2000:]}")
        rows[loader] = json.loads(r.stdout.strip().splitlines()[-1])
    size = ckpt.stat().st_size / 2**20
    print(f"load {ckpt.name} ({size:.0f} MiB file) as {args.load_dtype or args.dtype} on CPU, every weight read once")
    print("| loader | seconds | peak RSS MiB | weights MiB | peak / weights |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['weights_mib']:.0f} | "
              f"{r['peak_mib'] / r['weights_mib']:.2f} |")


if __name__ == "__main__":
    main()
