"""Full difference: ``diff`` (shape of W0) and/or ``diff_b`` (bias); no alpha, no rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Tensors, any_of, f32

if TYPE_CHECKING:
    from torch import Tensor


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    import torch

    if "diff" in tensors:
        return f32(tensors["diff"]) * scale
    if base is None:
        raise ValueError("bias-only full diff: pass base_weight for a zero ΔW")
    return torch.zeros(base.shape, dtype=torch.float32, device=base.device)


def bias_delta(tensors: Tensors, scale: float) -> Tensor | None:
    b = tensors.get("diff_b")
    return None if b is None else f32(b).reshape(-1) * scale


FULL = NetworkType(
    name="full",
    required=frozenset(),
    optional=frozenset({"diff", "diff_b"}),
    alternatives=any_of({"diff"}, {"diff_b"}),
    delta=delta,
    bias_delta=bias_delta,
    doc="Full: stored weight (and bias) difference",
)
