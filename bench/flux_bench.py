#!/usr/bin/env python
"""FLUX.1-dev-size LoRA training step on a GPU: s/step and peak VRAM with and without --fp8_base and block
swapping (issue 22 item 5; run by bench/gpu.sh).

    python bench/flux_bench.py --out DIR              # CUDA: the released FLUX.1-dev transformer config
    python bench/flux_bench.py --out DIR --cpu-smoke  # the same code on the CPU with a tiny deep FLUX

A random-weight transformer of the released config (19 double, 38 single blocks, width 3072: 11.9 B
parameters) is built once in CPU memory in bf16. Each run takes a copy, stores its Linear weights in fp8 where
asked (library/training/memory/fp8_storage.py, what --fp8_base does), places it on the GPU whole or with
``--blocks_to_swap N`` (library/training/memory/block_swap.py, what flux_train_network.py does), wraps it with
networks.lora_flux (rank 16, transformer only: cached text-encoder outputs) and times AdamW steps of the
flow-matching loss at 1024 px (4096 image + 512 T5 tokens), batch 1, gradient checkpointing, bf16 autocast.
The text encoders and the AE are not on the device (cached outputs and latents, as the recommended settings
do), so the peak is the transformer's training peak. The targets are issue 22's: fits in 24 GiB at 1024 px
with fp8_base, in 12 GiB with block swapping. Writes DIR/flux_bench.md and DIR/flux_bench.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from library.training.memory.block_swap import enable_flux_block_swap  # noqa: E402
from library.training.memory.fp8_storage import store_in_fp8  # noqa: E402

DEV_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
# (name, fp8, blocks_to_swap, target GiB or None)
RUNS = [("bf16", False, 0, None), ("fp8", True, 0, 24.0), ("fp8_swap16", True, 16, 12.0),
        ("fp8_swap28", True, 28, 12.0)]


def build_transformer(smoke: bool) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    if smoke:
        from library.models.flux_tiny import tiny_flux_config

        config = tiny_flux_config("dev", blocks=(4, 6))
    else:
        config = DEV_CONFIG
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # random weights; the scale keeps activations finite through 57 blocks
    model.requires_grad_(False)
    return model


def inputs(model, size: int, text_tokens: int, device: torch.device) -> dict:
    cfg = model.config
    side = size // 16  # latents /8, 2x2 patches
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                     indexing="ij"), -1).reshape(-1, 3)
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g).to(device, torch.bfloat16),
                encoder_hidden_states=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g)
                .to(device, torch.bfloat16),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, torch.bfloat16),
                timestep=torch.tensor([0.7], device=device), guidance=torch.tensor([1.0], device=device),
                img_ids=ids.to(device), txt_ids=torch.zeros(text_tokens, 3, device=device), return_dict=False)


def one_run(master, name: str, fp8: bool, swap: int, device: torch.device, size: int, text_tokens: int,
            warmup: int, steps: int) -> dict:
    from networks import lora_flux

    model = copy.deepcopy(master)
    if fp8:
        store_in_fp8(model, torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    network = lora_flux.create_network(1.0, 16, 16, None, [], model)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    network.to(device)
    if swap:
        enable_flux_block_swap(model, swap, device)
    else:
        model.to(device)
    model.enable_gradient_checkpointing()
    model.train()
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    batch = inputs(model, size, text_tokens, device)
    target = torch.randn_like(batch["hidden_states"], dtype=torch.float32)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**batch)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    row = {"name": name, "fp8_base": fp8, "blocks_to_swap": swap, "size": size,
           "s_per_step": statistics.median(times[warmup:]), "loss": float(loss)}
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    del model, network, optimizer
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for flux_bench.md and flux_bench.json")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny deep FLUX on the CPU, one step each")
    p.add_argument("--size", type=int, default=1024, help="image size in pixels (default 1024)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    master = build_transformer(smoke)
    print(f"transformer built in {time.perf_counter() - start:.0f} s: "
          f"{sum(t.numel() for t in master.parameters()) / 1e9:.2f} B parameters", flush=True)
    rows = []
    for name, fp8, swap, target in RUNS:
        if smoke:
            swap = min(swap, 4)  # the tiny model has 4 double and 6 single blocks
        size, tokens, steps = (64, 8, 1) if smoke else (a.size, 512, a.steps)
        row = one_run(master, name, fp8, swap, device, size, tokens, warmup=0 if smoke else 1, steps=steps)
        row["target_gib"] = target
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| run | fp8_base | blocks_to_swap | px | s/step | peak allocated GiB | peak reserved GiB | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['fp8_base']} | {r['blocks_to_swap']} | {r['size']} | "
                     f"{r['s_per_step']:.3f} | {r.get('peak_allocated_gib', float('nan')):.2f} | "
                     f"{r.get('peak_reserved_gib', float('nan')):.2f} | "
                     f"{'<= %.0f GiB' % r['target_gib'] if r['target_gib'] else ''} |")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    text = f"FLUX.1-dev-size LoRA step ({device_name}; bench/flux_bench.py)\n\n" + "\n".join(lines) + "\n"
    (out / "flux_bench.md").write_text(text, encoding="utf-8")
    (out / "flux_bench.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=1),
                                         encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
