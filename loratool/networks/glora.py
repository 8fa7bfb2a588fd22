"""GLoRA (current LyCORIS layout): ΔW = s · (W0·A + B), A = a1 @ a2 over the input axis.

Linear: ``a1 [in, r]``, ``a2 [r, in]``, ``b1 [out, r]``, ``b2 [r, in]``; conv: the same
as 1×1 kernels except ``b2 [r, in, kh, kw]`` (or ``b2 [r, in, 1, 1]`` + Tucker core
``bm [r, r, kh, kw]``). s = alpha / r, r = ``a2.shape[0]``. The pre-2.0 LyCORIS ordering
that ComfyUI detects as ``old_glora`` is not supported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, f32, mat

if TYPE_CHECKING:
    from torch import Tensor


def rank(shapes: Shapes) -> int | None:
    return shapes["a2"][0] if "a2" in shapes else None


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
    doc="GLoRA: W0-dependent generalised LoRA",
)
