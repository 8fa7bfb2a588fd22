"""LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), each factor optionally Tucker-rebuilt.

Plain: ``hada_w*_a [out, r]``, ``hada_w*_b [r, in·kh·kw]`` (or ``[r, in, kh, kw]``).
Tucker: ``hada_t* [r, r, kh, kw]`` with ``hada_w*_a [r, out]``, ``hada_w*_b [r, in]``;
factor = Σ t[i, j] · w_a[i, p] · w_b[j, q]. rank = ``hada_w1_b.shape[0]``.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, f32, mat, ndim, need

if TYPE_CHECKING:
    from torch import Tensor


def rank(shapes: Shapes) -> int | None:
    return shapes["hada_w1_b"][0] if "hada_w1_b" in shapes else None


def _factor(tensors: Tensors, i: int) -> Tensor:
    import torch

    w_a, w_b = f32(tensors[f"hada_w{i}_a"]), f32(tensors[f"hada_w{i}_b"])
    t = tensors.get(f"hada_t{i}")
    if t is not None:
        return torch.einsum("i j ..., i p, j q -> p q ...", f32(t), mat(w_a), mat(w_b))
    w = mat(w_a) @ mat(w_b)
    return w.reshape(w_a.shape[0], *w_b.shape[1:])


def _factor_shape(shapes: Shapes, i: int) -> tuple[int, ...]:
    a, b = ndim(shapes, f"hada_w{i}_a", 2), ndim(shapes, f"hada_w{i}_b", 2)
    if f"hada_t{i}" in shapes:
        t = ndim(shapes, f"hada_t{i}", 2)
        need(t[0] == a[0] and t[1] == b[0], f"hada_t{i} {list(t)} does not join hada_w{i}_a {list(a)} and hada_w{i}_b {list(b)}")
        return (prod(a[1:]), prod(b[1:]), *t[2:])
    need(prod(a[1:]) == b[0], f"rank differs: hada_w{i}_a {list(a)} vs hada_w{i}_b {list(b)}")
    return (a[0], *b[1:])


def delta_shape(shapes: Shapes, base: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Both Hadamard factors must have one shape, which is ΔW's."""
    w1, w2 = _factor_shape(shapes, 1), _factor_shape(shapes, 2)
    need(w1 == w2, f"the two LoHa factors differ in shape: {list(w1)} vs {list(w2)}")
    return w1


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    return _factor(tensors, 1) * _factor(tensors, 2) * scale


LOHA = NetworkType(
    name="loha",
    required=frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    optional=frozenset({"hada_t1", "hada_t2"}),
    rank=rank,
    uses_alpha=True,
    delta=delta,
    delta_shape=delta_shape,
    doc="LoHa: Hadamard product of two low-rank factors",
)
