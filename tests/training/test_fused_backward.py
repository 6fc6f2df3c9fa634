"""The optimizer step inside backward (--fused_backward_pass, --fused_optimizer_groups) against the plain step.

Oracles: transformers' own ``Adafactor.step`` / torch's ``AdamW.step`` on the same gradients (after the whole
backward), and per-parameter clipping written out as ``g * min(1, c / (|g| + 1e-6))`` (torch's formula).
"""
import copy

import pytest
import torch
from transformers.optimization import Adafactor

from library.training.optim.fused_backward import (BackwardStepOptimizer, ChunkStepper, attach_fused_adafactor,
                                                   first_chunk_of_groups, split_into_chunks)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                               torch.nn.Linear(8, 3))


def _loss(model, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y) * 50  # large gradients: clipping matters


def _adafactor(params):
    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def _clip_each(model, max_norm):
    for p in model.parameters():
        norm = p.grad.norm()
        p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_fused_adafactor_equals_the_plain_step(max_norm):
    plain, fused = _model(), _model()
    groups = lambda m: [{"params": list(m[0].parameters()), "lr": 1e-2}, {"params": list(m[2:].parameters()),
                                                                          "lr": 3e-3}]
    opt_plain = _adafactor(groups(plain))
    stepper = attach_fused_adafactor(_adafactor(groups(fused)), max_norm)
    for step in range(3):
        _loss(plain, step).backward()
        if max_norm:
            _clip_each(plain, max_norm)  # sd-scripts' fused pass clips each parameter on its own
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        _loss(fused, step).backward()
        assert all(p.grad is None for p in fused.parameters())  # consumed inside backward
        stepper.step()
        stepper.zero_grad()
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)


def test_optimizer_groups_equal_one_adamw():
    plain, fused = _model(), _model()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    chunks = split_into_chunks([{"params": list(fused.parameters()), "lr": 1e-2}], 3)
    optimizers = [torch.optim.AdamW(c.params, lr=c.lr) for c in chunks]
    stepper = ChunkStepper(optimizers, 0.0)
    facade = BackwardStepOptimizer(optimizers, stepper.finish)
    for step in range(3):
        _loss(plain, step).backward()
        opt_plain.step()
        opt_plain.zero_grad()
        _loss(fused, step).backward()
        assert all(p.grad is None for p in fused.parameters())
        facade.step()
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)


def test_a_chunk_missing_a_gradient_steps_at_finish():
    model = _model()
    unused = torch.nn.Parameter(torch.zeros(2))
    chunks = split_into_chunks([{"params": list(model.parameters()) + [unused], "lr": 0.1}], 1)
    opt = torch.optim.SGD(chunks[0].params, lr=0.1)
    stepper = ChunkStepper([opt], 0.0)
    before = copy.deepcopy(model[0].weight.detach())
    _loss(model, 0).backward()
    assert torch.equal(model[0].weight, before)  # waiting for the unused parameter's gradient
    stepper.finish()
    assert not torch.equal(model[0].weight, before)


def test_chunks_follow_sd_scripts_split():
    """ceil(total / N) per chunk; a new chunk where the rate changes; equal rates that follow share a chunk."""
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(10)]
    groups = [{"params": p[:5], "lr": 1.0}, {"params": p[5:7], "lr": 2.0}, {"params": p[7:], "lr": 2.0}]
    chunks = split_into_chunks(groups, 3)  # 4 per chunk
    index = {id(x): i for i, x in enumerate(p)}
    assert [[index[id(x)] for x in c.params] for c in chunks] == [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9]]
    assert [c.lr for c in chunks] == [1.0, 1.0, 2.0, 2.0]
    assert first_chunk_of_groups(chunks, groups) == [0, 2, 2]
