"""From an SVD to LoRA factors, scale folding, and an |value| quantile clamp."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loratool.lowrank.svd import SVD


def split_factors(svd: SVD, k: int | None = None) -> tuple[Tensor, Tensor]:
    """``(up, down) = (U·√S, √S·Vh)`` over the first ``k`` triplets, so ``up @ down`` is
    the rank-k truncation and both factors carry the same magnitude (an fp16 output keeps
    precision on both sides, unlike S folded into one)."""
    if k is not None:
        svd = svd.truncate(k)
    root = svd.S.clamp_min(0).sqrt()
    return svd.U * root.unsqueeze(-2), root.unsqueeze(-1) * svd.Vh


def fold_scale(up: Tensor, down: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Factors whose product is ``scale · up @ down``: √|scale| on each side, the sign on
    ``up`` (negative scales stay exact)."""
    root = math.sqrt(abs(scale))
    return up * math.copysign(root, scale), down * root


def abs_quantile(values: Tensor | list[Tensor], q: float) -> Tensor:
    """The ``q``-quantile of |values| (all tensors together), linear interpolation between
    order statistics as ``torch.quantile`` does, via ``kthvalue``: no 16M-element limit.

    Returns a 0-d float32 tensor on the values' device."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    parts = values if isinstance(values, list) else [values]
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32).abs() for t in parts])
    n = flat.numel()
    if n == 0:
        raise ValueError("no values")
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    below = torch.kthvalue(flat, lo + 1).values
    if hi == lo:
        return below
    above = torch.kthvalue(flat, hi + 1).values
    return below + (above - below) * (pos - lo)


def clamp_quantile(up: Tensor, down: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """Clamp both factors to ±(the ``q``-quantile of their |values| together).

    kohya's extractor clamps at the quantile of the *signed* values with
    ``torch.quantile``, which fails beyond 16M elements (PEERS-kohya.md §1); this one
    uses magnitudes, so a clamp never moves a value toward zero's other side."""
    hi = abs_quantile([up, down], q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)
