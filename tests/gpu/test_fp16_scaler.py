"""--full_fp16 on GPUs: the grad scaler must unscale fp16 gradients (as sd-scripts patches it). The scaler
itself runs on the CPU too, so the unscale path is tested here with exact numbers."""
from __future__ import annotations

import pytest
import torch

from library.training.runners.accelerate_setup import allow_fp16_unscale


def _scaled_fp16_grads(scaler):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.5)
    loss = (p.float() * torch.tensor([1.0, 2.0, 3.0])).sum()
    scaler.scale(loss).backward()
    return p, opt


def test_unpatched_scaler_refuses_fp16_gradients():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    _, opt = _scaled_fp16_grads(scaler)
    with pytest.raises(ValueError, match="unscale FP16 gradients"):
        scaler.unscale_(opt)


def test_patched_scaler_unscales_and_steps_fp16_gradients():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    allow_fp16_unscale(scaler)
    p, opt = _scaled_fp16_grads(scaler)
    assert p.grad.tolist() == [2.0, 4.0, 6.0]  # scaled by 2
    scaler.unscale_(opt)
    assert p.grad.dtype == torch.float16 and p.grad.tolist() == [1.0, 2.0, 3.0]  # d loss / d p
    scaler.step(opt)
    assert p.tolist() == [0.5, 0.0, -0.5]  # 1 - 0.5 * grad


def test_patched_scaler_still_skips_an_overflowing_step():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    allow_fp16_unscale(scaler)
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.5)
    scaler.scale((p.float() * 1e4).sum()).backward()  # 1e4 * 65536 overflows fp16: inf gradients
    scaler.step(opt)
    scaler.update()
    assert p.tolist() == [1.0, 1.0] and scaler.get_scale() == 2.0 ** 15  # step skipped, scale halved


def test_no_scaler_is_left_alone():
    allow_fp16_unscale(None)  # CPU / bf16 runs have no scaler: nothing to do, no error
