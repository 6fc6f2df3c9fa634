"""Low-rank maths shared by the LoRA tools: deltas, truncated SVD, clamping, dynamic rank choice.

spec utilities §8 (svd_merge), §9 (resize), §10 (extract). All SVDs run in float32 (or float64 when
given) whatever the working precision: ``torch.linalg.svd`` has no fp16/bf16 kernels on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lora_modules import compose_delta

MIN_SV = 1e-6  # resize: a leading singular value at or below this is a zero matrix (rank 1)
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def module_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """``(alpha/rank)·up@down`` in the original layer's layout, float32; alpha None -> rank (scale 1)."""
    rank = down.shape[0]
    scale = 1.0 if alpha is None or float(alpha) == 0 else float(alpha) / rank
    return compose_delta(up.float(), down.float()) * scale


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """(out, in) view of a weight delta: 1x1 squeezed, k x k flattened to (out, in·k·k)."""
    return delta.flatten(1) if delta.ndim == 4 else delta


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) without its 16M-element input limit."""
    flat = values.flatten().float()
    if flat.numel() <= 2**24:
        return torch.quantile(flat, q)
    ordered = flat.sort().values
    pos = q * (ordered.numel() - 1)
    low, frac = int(math.floor(pos)), pos - math.floor(pos)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * frac


@dataclass
class Factors:
    """``up``/``down`` in LoRA layout plus the full spectrum they were cut from."""

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor  # all of them, descending
    rank: int


def svd_factors(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None,
                device: str | torch.device | None = None) -> Factors:
    """Best rank-``r`` factors of ``delta`` (r = min(rank, in, out)): ``up = U_r·S_r``, ``down = V_rᵀ``.

    With ``clamp_quantile`` both factors are clamped to ``[−h, h]``, h = that quantile of their values
    (spec §8/§10); resize passes None (no clamping, §9). Conv deltas come back as (out,r,1,1)/(r,in,k,k).
    """
    mat = as_matrix(delta).to(device or delta.device, torch.float32)
    out_dim, in_dim = mat.shape
    rank = max(1, min(int(rank), out_dim, in_dim))
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    up = u[:, :rank] @ torch.diag(s[:rank])
    down = vh[:rank, :]
    if clamp_quantile is not None:
        hi = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if delta.ndim == 4:
        up = up.reshape(out_dim, rank, 1, 1)
        down = down.reshape(rank, *delta.shape[1:])
    return Factors(up.cpu().contiguous(), down.cpu().contiguous(), s.cpu(), rank)


def _clamp_index(index: int, length: int) -> int:
    return max(1, min(index, length - 1))


def dynamic_rank(s: torch.Tensor, method: str | None, param: float | None, max_rank: int) -> int:
    """Resize rank for singular values ``s`` (descending), spec §9 formulas.

    sv_ratio: c = #{σ_i > σ_0/p}; sv_cumulative: c = searchsorted(cumsum(σ)/Σσ, p) + 1;
    sv_fro: c = searchsorted(cumsum(σ²)/Σσ², p²) + 1; each c clamped to [1, len−1], rank = c + 1;
    fixed: ``max_rank``. Then σ_0 ≤ 1e−6 gives 1 and anything above ``max_rank`` is capped.
    """
    s = s.float()
    if method == "sv_ratio":
        rank = _clamp_index(int((s > s[0] / param).sum()), len(s)) + 1
    elif method == "sv_cumulative":
        cumulative = torch.cumsum(s, 0) / s.sum()
        rank = _clamp_index(int(torch.searchsorted(cumulative, float(param))) + 1, len(s)) + 1
    elif method == "sv_fro":
        squared = s.pow(2)
        cumulative = torch.cumsum(squared, 0) / squared.sum()
        rank = _clamp_index(int(torch.searchsorted(cumulative, float(param) ** 2)) + 1, len(s)) + 1
    elif method is None:
        rank = max_rank
    else:
        raise ValueError(f"unknown dynamic method {method!r}; expected one of {DYNAMIC_METHODS}")
    if float(s[0]) <= MIN_SV:
        return 1
    return min(rank, max_rank)


@dataclass
class Retention:
    """What a rank cut keeps of a spectrum: shares of Σσ and of the Frobenius norm, σ_0/σ_{r−1}."""

    sum_retained: float
    fro_retained: float
    max_ratio: float


def retention(s: torch.Tensor, rank: int) -> Retention:
    """Retention numbers of resize's ``--verbose`` report (as sd-scripts computes them)."""
    s = s.float()
    squared = s.pow(2)
    fro = float(squared[:rank].sum().sqrt() / squared.sum().sqrt()) if float(squared.sum()) > 0 else float("nan")
    total = float(s.abs().sum())
    return Retention(float(s[:rank].abs().sum()) / total if total > 0 else float("nan"), fro,
                     float(s[0] / s[rank - 1]) if float(s[rank - 1]) > 0 else float("inf"))


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖reference − approx‖_F / ‖reference‖_F`` (0 for a zero reference that is matched exactly)."""
    reference, approx = reference.float(), approx.float()
    norm = float(reference.norm())
    diff = float((reference - approx).norm())
    if norm == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / norm
