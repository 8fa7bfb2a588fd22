"""Norm-layer difference: ``w_norm`` added to the norm weight, ``b_norm`` to its bias."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, any_of, f32, ndim, need

if TYPE_CHECKING:
    from torch import Tensor


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    import torch

    if "w_norm" in tensors:
        return f32(tensors["w_norm"]) * scale
    if base is None:
        raise ValueError("bias-only norm diff: pass base_weight for a zero ΔW")
    return torch.zeros(base.shape, dtype=torch.float32, device=base.device)


def delta_shape(shapes: Shapes, base: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """``w_norm``'s shape (W0's when only ``b_norm`` is stored): both one value per channel."""
    sizes = {ndim(shapes, name, 1, 1)[0] for name in ("w_norm", "b_norm") if name in shapes}
    need(len(sizes) == 1, "w_norm and b_norm differ in length")
    return tuple(shapes["w_norm"]) if "w_norm" in shapes else base


def bias_delta(tensors: Tensors, scale: float) -> Tensor | None:
    b = tensors.get("b_norm")
    return None if b is None else f32(b).reshape(-1) * scale


NORM = NetworkType(
    name="norm",
    required=frozenset(),
    optional=frozenset({"w_norm", "b_norm"}),
    alternatives=any_of({"w_norm"}, {"b_norm"}),
    delta=delta,
    bias_delta=bias_delta,
    delta_shape=delta_shape,
    weight_params=frozenset({"w_norm"}),
    doc="Norm: additive change to a normalisation layer",
)
