"""--blocks_to_swap on a CUDA GPU (bench/gpu.sh): the side-stream copies and the allocator bookkeeping that the
CPU tests (tests/training/test_block_swap.py) cannot reach. Oracle: the same model without swapping, same
inputs: forward and gradients equal; and the peak allocated memory drops by most of the swapped blocks' bytes."""
from __future__ import annotations

import copy

import pytest
import torch

from library.training.memory.block_swap import enable_flux_block_swap, flux_block_split

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU (bench/gpu.sh runs these)")]
CONFIG = dict(patch_size=1, in_channels=64, num_layers=6, num_single_layers=12, attention_head_dim=128,
              num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))


def _model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    model.requires_grad_(False)
    model.x_embedder.requires_grad_(True)
    model.enable_gradient_checkpointing()
    model.train()
    return model


def _step(model, device, seed):
    g = torch.Generator().manual_seed(seed)
    side, text = 16, 8
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                     indexing="ij"), -1).reshape(-1, 3)
    x = torch.randn(1, side * side, 64, generator=g).to(device).requires_grad_(True)
    out = model(hidden_states=x, encoder_hidden_states=torch.randn(1, text, 64, generator=g).to(device),
                pooled_projections=torch.randn(1, 32, generator=g).to(device),
                timestep=torch.tensor([0.5], device=device),
                guidance=torch.tensor([2.0], device=device), img_ids=ids.to(device),
                txt_ids=torch.zeros(text, 3, device=device), return_dict=False)[0]
    out.square().mean().backward()
    torch.cuda.synchronize()
    return out.detach().cpu(), x.grad.cpu(), model.x_embedder.weight.grad.cpu()


def test_swapped_blocks_on_the_gpu_compute_the_same_and_use_less_memory():
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    plain = _model()
    swapped = copy.deepcopy(plain)
    plain.to(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ref = [_step(plain, device, seed) for seed in range(3)]
    plain_peak = torch.cuda.max_memory_allocated() - base
    plain.to("cpu")
    del plain
    torch.cuda.empty_cache()
    to_swap = 8
    double, single = flux_block_split(to_swap, 6, 12)
    kinds = ((swapped.transformer_blocks, double), (swapped.single_transformer_blocks, single))
    block_bytes = sum(t.numel() * t.element_size() for blocks, n in kinds for b in list(blocks)[:n]
                      for t in b.parameters())
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    enable_flux_block_swap(swapped, to_swap, device)
    got = [_step(swapped, device, seed) for seed in range(3)]
    swap_peak = torch.cuda.max_memory_allocated() - base
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=0, atol=0)
    # one block of each kind may be in flight (prefetch) on top of the resident ones
    one_each = sum(t.numel() * t.element_size() for b in (swapped.transformer_blocks[0],
                                                          swapped.single_transformer_blocks[0])
                   for t in b.parameters())
    assert swap_peak <= plain_peak - block_bytes + one_each * 1.1, (plain_peak, swap_peak, block_bytes)
