#!/usr/bin/env python
"""Peak memory of one SDXL full fine-tuning step: the plain optimizer step against the step inside backward.

    OMP_NUM_THREADS=1 python bench/sdxl_fused_memory.py            # all three modes, one process each

The real-size SDXL U-Net (2.57 B parameters, released config, seeded random weights) is built for real on the
CPU (no meta tensors) in bfloat16, as sd-scripts' one-card SDXL recipe trains it (``--full_bf16``, AdaFactor,
gradient checkpointing). Each mode runs in its own process and reports its peak resident set (VmHWM, reset
after the model is built, so it is the training step's peak) next to the bytes the weights take:

* ``plain``: backward fills every gradient (2 bytes per parameter), then ``Adafactor.step()``;
* ``fused``: ``--fused_backward_pass``: each parameter steps in its post-accumulate-grad hook and drops its
  gradient (library/training/optim/fused_backward.py, the code sdxl_train.py runs);
* ``groups``: ``--fused_optimizer_groups 10``: ten AdaFactors, each stepped once its gradients are complete.

Latents are 16 x 16 (128 px) with batch 1, so activations are small and the difference is the gradients'.
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

import torch  # noqa: E402
from transformers.optimization import Adafactor  # noqa: E402

from bench.memory import peak_rss_mib  # noqa: E402
from library.models.real_size import unet_config  # noqa: E402
from library.training.optim.fused_backward import (BackwardStepOptimizer, ChunkStepper,  # noqa: E402
                                                   attach_fused_adafactor, split_into_chunks)

MODES = ("plain", "fused", "groups")
GIB = 2**30


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5), so the peak is the training step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _adafactor(params) -> Adafactor:
    return Adafactor(params, lr=1e-6, relative_step=False, scale_parameter=False, warmup_init=False)


def _build_unet():
    from diffusers import UNet2DConditionModel  # start-up (diffusers: ~2 s)

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # parameters are made in bf16: no float32 copy ever exists
    try:
        unet = UNet2DConditionModel(**unet_config("sdxl"))
    finally:
        torch.set_default_dtype(torch.float32)
    unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def _optimizer(unet, mode: str):
    params = [p for p in unet.parameters() if p.requires_grad]
    if mode == "plain":
        return _adafactor(params)
    if mode == "fused":
        return attach_fused_adafactor(_adafactor(params), 0.0)
    chunks = split_into_chunks([{"params": params, "lr": 1e-6}], 10)
    optimizers = [_adafactor(c.params) for c in chunks]
    return BackwardStepOptimizer(optimizers, ChunkStepper(optimizers, 0.0).finish)


def _step(unet, optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    x = torch.randn(1, 4, 16, 16, generator=g).to(dt)
    ctx = torch.randn(1, 77, 2048, generator=g).to(dt)
    added = {"text_embeds": torch.randn(1, 1280, generator=g).to(dt),
             "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]]).to(dt)}
    pred = unet(x, torch.tensor([500]), ctx, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), torch.randn(pred.shape, generator=g))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def run_one(mode: str, steps: int) -> dict:
    t0 = time.perf_counter()
    unet = _build_unet()
    n = sum(p.numel() for p in unet.parameters())
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    optimizer = _optimizer(unet, mode)
    built = peak_rss_mib()
    reset = _reset_peak()
    baseline = peak_rss_mib()
    t1 = time.perf_counter()
    losses = [_step(unet, optimizer, s) for s in range(steps)]
    step_s = (time.perf_counter() - t1) / steps
    grads_left = sum(p.grad is not None for p in unet.parameters())
    return {"mode": mode, "params": n, "weights_gib": weights / GIB, "build_peak_gib": built / 1024,
            "rss_before_steps_gib": baseline / 1024, "peak_gib": peak_rss_mib() / 1024, "peak_reset": reset,
            "losses": losses, "s_per_step": step_s, "build_s": t1 - t0, "grads_left": grads_left}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default=None, help="run one mode in this process (default: all, "
                                                                "each in its own process)")
    p.add_argument("--steps", type=int, default=2, help="training steps per mode (default 2)")
    p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(run_one(args.mode, args.steps)))
        return
    results = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)],
                             capture_output=True, text=True, env=dict(os.environ), check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain = results[0]["peak_gib"]
    print(f"SDXL U-Net {results[0]['params'] / 1e9:.2f} B parameters, bf16 weights "
          f"{results[0]['weights_gib']:.2f} GiB, AdaFactor, gradient checkpointing, batch 1 at 128 px, CPU")
    print(f"{'mode':8} {'peak RSS (GiB)':>15} {'vs plain':>9} {'RSS before steps':>17} {'s/step':>7}")
    for r in results:
        print(f"{r['mode']:8} {r['peak_gib']:15.2f} {r['peak_gib'] - plain:+9.2f} {r['rss_before_steps_gib']:17.2f} "
              f"{r['s_per_step']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
