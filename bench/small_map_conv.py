#!/usr/bin/env python
"""Real-size U-Net forward + backward on the CPU: PyTorch's convolutions against the matrix path of
``library/models/small_map_conv.py``, same model, input and seed, alternating in one process.

    OMP_NUM_THREADS=1 python bench/small_map_conv.py [--family sd1] [--resolution 64 256] [--repeats 3]

The backward takes the gradients of the noisy latents and the text context, as a LoRA step's does (the frozen
U-Net's weights need none). Prints s per forward + backward for both, their ratio, how many layers took the
matrix path and the largest relative difference of the outputs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd1", choices=["sd1", "sdxl"])
    ap.add_argument("--resolution", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    from library.models import small_map_conv as smc
    from library.models.real_size import unet_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    cfg = unet_config(a.family)
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    convs = [m for m in unet.modules() if type(m) is torch.nn.Conv2d]
    taken: list[int] = []
    product = smc.matrix_conv2d
    smc.matrix_conv2d = lambda *args: taken.append(1) or product(*args)  # counts the layers on the path

    def set_matrix(on: bool) -> None:
        if on:
            smc.use_matrix_convs(unet)
            return
        for m in convs:
            m.__dict__.pop("_conv_forward", None)

    print(f"{a.family} U-Net, {torch.get_num_threads()} thread(s), {a.repeats} repeats, forward + backward")
    print(f"{'px':>5s} {'conv2d s':>9s} {'matrix s':>9s} {'ratio':>6s} {'layers':>7s} {'max rel diff':>13s}")
    for px in a.resolution:
        g = torch.Generator().manual_seed(px)
        lat = px // 8
        x0 = torch.randn(1, unet.config.in_channels, lat, lat, generator=g)
        ctx0 = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
        extra = {}
        if a.family == "sdxl":
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, generator=g),
                                           "time_ids": torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)}}

        def step():
            x, ctx = x0.clone().requires_grad_(), ctx0.clone().requires_grad_()
            out = unet(x, torch.tensor([500]), ctx, **extra).sample
            out.backward(torch.ones_like(out))
            return out.detach()

        times = {False: [], True: []}
        outs = {}
        for on in (False, True):  # warm-up, outputs
            set_matrix(on)
            outs[on] = step()
        for i in range(a.repeats):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                set_matrix(on)
                taken.clear()
                t = time.perf_counter()
                step()
                times[on].append(time.perf_counter() - t)
                if on:
                    layers = len(taken)
        set_matrix(False)
        plain, matrix = statistics.median(times[False]), statistics.median(times[True])
        diff = ((outs[True] - outs[False]).abs().max() / outs[False].abs().max()).item()
        print(f"{px:5d} {plain:9.3f} {matrix:9.3f} {matrix / plain:6.2f} {layers:7d} {diff:13.1e}", flush=True)


if __name__ == "__main__":
    main()
