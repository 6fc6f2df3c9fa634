"""Wide convolutions over small feature maps on the CPU, computed as one matrix product (unfold + linear).

On the CPU, PyTorch runs a 3x3 convolution either with oneDNN or with its own im2col kernel. For the U-Net's
wide layers on small maps (640-1280 channels at 8x8 and below: the lower levels of an SD U-Net at 64-256 px)
both are slow: oneDNN's kernels are tuned for larger maps, and the im2col kernel hands BLAS a matrix product
with only a handful of columns and takes the input's gradient through a slow col2im. The same arithmetic written
as ``unfold`` + ``F.linear`` gives BLAS a short, wide product it handles well, in the forward pass and in the
backward (``grad_out @ W``, then ``fold``). Real-size SD1.5 U-Net, forward + backward with the input's
gradient (AMD EPYC, float32): 64 px 1.74 -> 1.05 s on one thread, 1.20 -> 0.87 s on two; 256 px 7.25 -> 5.85 s
(bench/RESULTS.md, issue 18).

Which layers: a fixed rule (:func:`takes_matrix_path`), never a timing, so a run and its resumed run, and every
process of a multi-process run, compute the same way. The products are the same, summed in a different order:
outputs differ from ``F.conv2d``'s by float32 rounding (~2e-6 relative), as two oneDNN versions do. Tiny
test models have no layer wide enough, so their results are bit for bit unchanged. ``SDT_PLAIN_CONV=1`` keeps
PyTorch's convolution everywhere.
"""
from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F

OPT_OUT = "SDT_PLAIN_CONV"  # =1 keeps F.conv2d for every layer
MAX_MAP = 64  # input height x width at most (8x8)
MIN_WEIGHT = 2**20  # weight elements at least (640 -> 640 3x3 has 3.7 M; SD's 320 -> 320 has 0.9 M)


def takes_matrix_path(conv: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The rule: a float32 CPU tensor, a plain convolution (no groups, dilation or padding mode) with a kernel
    larger than 1x1 (1x1 is already one product), a wide weight and a small map."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and weight.shape[-2:] != (1, 1)
            and x.shape[-2] * x.shape[-1] <= MAX_MAP and weight.numel() >= MIN_WEIGHT)


def matrix_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                  padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` for groups 1 and dilation 1, as unfold + linear; autograd
    differentiates it with respect to input, weight and bias as usual."""
    n, _, h, w = x.shape
    out_ch, _, kh, kw = weight.shape
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (w + 2 * padding[1] - kw) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (n, in_ch * kh * kw, oh * ow)
    out = F.linear(cols.transpose(1, 2), weight.reshape(out_ch, -1), bias)  # (n, oh * ow, out_ch)
    return out.transpose(1, 2).reshape(n, out_ch, oh, ow)


def _conv_forward(self: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    if takes_matrix_path(self, x, weight):
        return matrix_conv2d(x, weight, bias, self.stride, self.padding)
    return torch.nn.Conv2d._conv_forward(self, x, weight, bias)


def use_matrix_convs(model: torch.nn.Module) -> int:
    """Give every ``Conv2d`` of ``model`` the rule above (decided per call, from the input it gets: a layer on
    a GPU or on a large map keeps ``F.conv2d``); returns how many layers could take it. The layer's own
    ``forward`` and its parameters are untouched, so LoRA hooks, fp8 storage and state dicts see no change."""
    if os.environ.get(OPT_OUT, "") == "1":
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Conv2d:
            module._conv_forward = types.MethodType(_conv_forward, module)
            count += module.weight.numel() >= MIN_WEIGHT
    return count
