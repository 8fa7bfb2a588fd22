"""Full difference: ``diff`` (shape of W0) and/or ``diff_b`` (bias); no alpha, no rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, any_of, f32, ndim, need

if TYPE_CHECKING:
    from torch import Tensor


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    import torch

    if "diff" in tensors:
        return f32(tensors["diff"]) * scale
    if base is None:
        raise ValueError("bias-only full diff: pass base_weight for a zero ΔW")
    return torch.zeros(base.shape, dtype=torch.float32, device=base.device)


def delta_shape(shapes: Shapes, base: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """``diff``'s shape (W0's when only ``diff_b`` is stored); ``diff_b`` has one value per row."""
    diff = ndim(shapes, "diff", 1) if "diff" in shapes else None
    if "diff_b" in shapes:
        bias = ndim(shapes, "diff_b", 1, 1)
        rows = diff[0] if diff else base[0] if base else None
        need(rows is None or bias[0] == rows, f"diff_b {list(bias)} does not hold one value per {rows} rows")
    return diff or base


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
    delta_shape=delta_shape,
    weight_params=frozenset({"diff"}),
    doc="Full: stored weight (and bias) difference",
)
