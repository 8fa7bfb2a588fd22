"""Norm-layer difference: ``w_norm`` added to the norm weight, ``b_norm`` to its bias."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Tensors, any_of, f32

if TYPE_CHECKING:
    from torch import Tensor


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    import torch

    if "w_norm" in tensors:
        return f32(tensors["w_norm"]) * scale
    if base is None:
        raise ValueError("bias-only norm diff: pass base_weight for a zero ΔW")
    return torch.zeros(base.shape, dtype=torch.float32, device=base.device)


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
    doc="Norm: additive change to a normalisation layer",
)
