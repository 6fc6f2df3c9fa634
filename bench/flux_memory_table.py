#!/usr/bin/env python
"""The FLUX.1 peak-memory estimate of ``--dry_run`` for common LoRA settings, as a table (docs/flux.md).

    OMP_NUM_THREADS=1 python bench/flux_memory_table.py [--rank 16] [--optimizer AdamW8bit]

Runs ``library.training.runners.flux_memory_estimate.estimate_flux`` with no model file, so every part counts as
the released FLUX.1-dev (built once on the meta device): LoRA on the transformer only
(``--network_train_unet_only``), ``--cache_latents``, ``--cache_text_encoder_outputs``,
``--gradient_checkpointing``, ``--mixed_precision bf16``, T5 512 tokens; square images at 512 and 1024 px,
batch 1 and 2, bf16 weights or ``--fp8_base``, ``--blocks_to_swap`` 0 / 16 / 22 / 28. Then upstream's own table
(docs/flux_train_network.md 6.1 of sd-scripts) next to what the estimate says for its settings. An estimate, not
a measurement: see the module's docstring for what it counts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library.training.runners.flux_memory_estimate import estimate_flux  # noqa: E402
from library.training.runners.memory_estimate import GIB  # noqa: E402

# sd-scripts docs/flux_train_network.md 6.1 (all with --fp8_base): (GPU GB, batch, blocks_to_swap); its example
# command (section 4) trains rank 16 with AdamW8bit, CLIP-L's LoRA too, latents and text-encoder outputs cached
UPSTREAM = ((24, 2, 0), (16, 1, 0), (16, 1, 8), (12, 1, 16), (10, 1, 22), (8, 1, 28))


def args_for(rank: int, optimizer: str, fp8: bool, swap: int, unet_only: bool = True) -> argparse.Namespace:
    return argparse.Namespace(
        pretrained_model_name_or_path=None, ae=None, clip_l=None, t5xxl=None, mixed_precision="bf16", fp8_base=fp8,
        fp8_base_unet=False, no_half_vae=False, network_dim=rank, network_args=None, network_train_unet_only=unet_only,
        cache_latents=True, cache_text_encoder_outputs=True, gradient_checkpointing=True, optimizer_type=optimizer,
        blocks_to_swap=swap or None, t5xxl_max_token_length=None, full_bf16=False, full_fp16=False)


def peak(rank: int, optimizer: str, fp8: bool, swap: int, px: int, batch: int, unet_only: bool = True) -> float:
    rows = estimate_flux(args_for(rank, optimizer, fp8, swap, unet_only), (px // 16) ** 2, batch)
    return rows[-1][1] / GIB


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optimizer", default="AdamW8bit")
    args = p.parse_args(argv)
    print(f"FLUX.1-dev LoRA rank {args.rank}, {args.optimizer}, bf16, gradient checkpointing, latents and text-encoder "
          "outputs cached, T5 512 tokens: estimated peak GiB")
    print()
    print("| weights | blocks_to_swap | 512 px, batch 1 | 512 px, batch 2 | 1024 px, batch 1 | 1024 px, batch 2 |")
    print("|---|---|---|---|---|---|")
    for fp8 in (False, True):
        for swap in (0, 16, 22, 28):
            cells = [f"{peak(args.rank, args.optimizer, fp8, swap, px, b):.1f}" for px in (512, 1024) for b in (1, 2)]
            print(f"| {'fp8 (--fp8_base)' if fp8 else 'bf16'} | {swap} | " + " | ".join(cells) + " |")
    print()
    print("sd-scripts' table (docs/flux_train_network.md 6.1, --fp8_base) against this estimate, with its example "
          "command's rank 16, AdamW8bit and CLIP-L LoRA (CLIP-L on the device):")
    print()
    print("| GPU | upstream's setting | estimate, 512 px | estimate, 1024 px |")
    print("|---|---|---|---|")
    for gb, batch, swap in UPSTREAM:
        cells = [f"{peak(16, 'AdamW8bit', True, swap, px, batch, unet_only=False):.1f} GiB" for px in (512, 1024)]
        print(f"| {gb} GB | batch {batch}, blocks_to_swap {swap} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
