"""LoKr: ΔW = kron(W1, W2), each factor full or low-rank (W2 optionally Tucker).

W1 = ``lokr_w1 [a, c]`` or ``lokr_w1_a [a, r] @ lokr_w1_b [r, c]``.
W2 = ``lokr_w2 [b, d(, kh, kw)]`` or ``lokr_w2_a [b, r] @ lokr_w2_b [r, d(·kh·kw)]``;
Tucker: ``lokr_t2 [r, r, kh, kw]`` with ``lokr_w2_a [r, b]``, ``lokr_w2_b [r, d]``.
W1 is unsqueezed to W2's rank for conv. out = a·b, in = c·d.

rank is read from the low-rank ``_b`` factor (``lokr_w2_b`` first, then ``lokr_w1_b``,
as ComfyUI/A1111 do); with both factors full there is no rank and the scale is 1
(LyCORIS ignores alpha then). PEFT LoKr always scales by alpha/r: decoders must fold that.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, any_of, f32, mat, ndim, need

if TYPE_CHECKING:
    from torch import Tensor


def rank(shapes: Shapes) -> int | None:
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if name in shapes:
            return shapes[name][0]
    return None


def _w1(tensors: Tensors) -> Tensor:
    if "lokr_w1" in tensors:
        return f32(tensors["lokr_w1"])
    return f32(tensors["lokr_w1_a"]) @ f32(tensors["lokr_w1_b"])


def _w2(tensors: Tensors) -> Tensor:
    import torch

    if "lokr_w2" in tensors:
        return f32(tensors["lokr_w2"])
    w_a, w_b = f32(tensors["lokr_w2_a"]), f32(tensors["lokr_w2_b"])
    if "lokr_t2" in tensors:
        return torch.einsum("i j ..., i p, j q -> p q ...", f32(tensors["lokr_t2"]), w_a, mat(w_b))
    w = w_a @ mat(w_b)
    return w.reshape(w_a.shape[0], *w_b.shape[1:])


def _w1_shape(shapes: Shapes) -> tuple[int, ...]:
    if "lokr_w1" in shapes:
        return ndim(shapes, "lokr_w1", 2, 2)
    a, b = ndim(shapes, "lokr_w1_a", 2, 2), ndim(shapes, "lokr_w1_b", 2, 2)
    need(a[1] == b[0], f"rank differs: lokr_w1_a {list(a)} vs lokr_w1_b {list(b)}")
    return (a[0], b[1])


def _w2_shape(shapes: Shapes) -> tuple[int, ...]:
    if "lokr_w2" in shapes:
        return ndim(shapes, "lokr_w2", 2)
    a, b = ndim(shapes, "lokr_w2_a", 2, 2), ndim(shapes, "lokr_w2_b", 2)
    if "lokr_t2" in shapes:
        t = ndim(shapes, "lokr_t2", 2)
        need(t[0] == a[0] and t[1] == b[0], f"lokr_t2 {list(t)} does not join lokr_w2_a {list(a)} and lokr_w2_b {list(b)}")
        return (a[1], prod(b[1:]), *t[2:])
    need(a[1] == b[0], f"rank differs: lokr_w2_a {list(a)} vs lokr_w2_b {list(b)}")
    return (a[0], *b[1:])


def delta_shape(shapes: Shapes, base: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """kron(W1, W2) with W1 unsqueezed to W2's dims: ``[a·b, c·d(, kh, kw)]``."""
    for half in ("w1", "w2"):
        need(
            (f"lokr_{half}_a" in shapes) == (f"lokr_{half}_b" in shapes),
            f"lokr_{half}_a and lokr_{half}_b come in pairs",
        )
    w1, w2 = _w1_shape(shapes), _w2_shape(shapes)
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    import torch

    w1, w2 = _w1(tensors), _w2(tensors)
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1.contiguous(), w2.contiguous()) * scale


LOKR = NetworkType(
    name="lokr",
    required=frozenset(),
    optional=frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    ),
    alternatives=any_of(
        {"lokr_w1", "lokr_w2"},
        {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2"},
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    ),
    rank=rank,
    uses_alpha=True,
    delta=delta,
    delta_shape=delta_shape,
    accepts=lambda shapes: (
        not ({"lokr_w1", "lokr_w1_a"} <= set(shapes))
        and not ({"lokr_w2", "lokr_w2_a"} <= set(shapes))
        and ("lokr_t2" not in shapes or "lokr_w2_a" in shapes)
    ),
    doc="LoKr: Kronecker product of two factors",
)
