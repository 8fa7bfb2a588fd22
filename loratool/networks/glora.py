"""GLoRA (current LyCORIS layout): ΔW = s · (W0·A + B), A = a1 @ a2 over the input axis.

Linear: ``a1 [in, r]``, ``a2 [r, in]``, ``b1 [out, r]``, ``b2 [r, in]``; conv: the same
as 1×1 kernels except ``b2 [r, in, kh, kw]`` (or ``b2 [r, in, 1, 1]`` + Tucker core
``bm [r, r, kh, kw]``). s = alpha / r, r = ``a2.shape[0]``. The pre-2.0 LyCORIS ordering
that ComfyUI detects as ``old_glora`` is not supported.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, f32, mat, ndim, need

if TYPE_CHECKING:
    from torch import Tensor


def rank(shapes: Shapes) -> int | None:
    return shapes["a2"][0] if "a2" in shapes else None


def delta_shape(shapes: Shapes, base: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """W0's shape: A = a1 @ a2 must be square over the input axis, B = b1 @ b2 (through
    bm) must have W0's element count."""
    a1, a2 = ndim(shapes, "a1", 2), ndim(shapes, "a2", 2)
    b1, b2 = ndim(shapes, "b1", 2), ndim(shapes, "b2", 2)
    need(prod(a1[1:]) == a2[0] and prod(a2[1:]) == a1[0], f"a1 {list(a1)} @ a2 {list(a2)} is not a square input map")
    if "bm" in shapes:
        bm = ndim(shapes, "bm", 2)
        need(bm[0] == prod(b1[1:]) and bm[1] == b2[0], f"bm {list(bm)} does not join b1 {list(b1)} and b2 {list(b2)}")
        wb = b1[0] * prod(b2[1:]) * prod(bm[2:])
    else:
        need(prod(b1[1:]) == b2[0], f"rank differs: b1 {list(b1)} vs b2 {list(b2)}")
        wb = b1[0] * prod(b2[1:])
    if base is not None:
        need(
            len(base) >= 2 and base[0] == b1[0] and base[1] == a1[0] and prod(base) == wb,
            f"GLoRA factors do not fit a weight of shape {list(base)}",
        )
    return base


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    import torch

    if base is None:
        raise ValueError("GLoRA's ΔW depends on the base weight; pass base_weight")
    w0 = f32(base)
    b1, b2 = f32(tensors["b1"]), f32(tensors["b2"])
    if "bm" in tensors:
        wb = torch.einsum("m n ..., i m, n j -> i j ...", f32(tensors["bm"]), mat(b1), mat(b2))
    else:
        wb = (mat(b1) @ mat(b2)).reshape(w0.shape)
    a = mat(f32(tensors["a1"])) @ mat(f32(tensors["a2"]))  # [in, in]
    wa = torch.einsum("o i ..., i j -> o j ...", w0, a)
    return (wa + wb.reshape(w0.shape)) * scale


GLORA = NetworkType(
    name="glora",
    required=frozenset({"a1", "a2", "b1", "b2"}),
    optional=frozenset({"bm"}),
    rank=rank,
    uses_alpha=True,
    delta=delta,
    needs_base=True,
    delta_shape=delta_shape,
    doc="GLoRA: W0-dependent generalised LoRA",
)
