"""Diagonal OFT (LyCORIS ``diag-oft``, kohya OFT): block-diagonal Cayley rotation of W0's rows.

``oft_blocks [n, b, b]`` with n·b = out; optional ``rescale [out, 1(, 1, 1)]``; ``alpha``
is a constraint, not a scale: Q = B − Bᵀ is shrunk to norm alpha·out when its Frobenius
norm (plus 1e-8) exceeds that (alpha None/0: no constraint; LyCORIS semantics, ComfyUI
caps at alpha instead). R = (I + Q)(I − Q)⁻¹ per block; with multiplier m,
R_m = m·R + (1 − m)·I; W' = rescale · (R_mᵀ W0) blockwise over output rows.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, as_alpha, f32, ndim, need

if TYPE_CHECKING:
    from torch import Tensor


def cayley(blocks: Tensor, constraint: float | None) -> Tensor:
    """R = (I + Q)(I − Q)⁻¹ for Q = B − Bᵀ, Q optionally norm-capped at ``constraint``."""
    import torch

    q = blocks - blocks.transpose(-1, -2)
    if constraint:
        q_norm = torch.linalg.vector_norm(q) + 1e-8
        if q_norm > constraint:
            q = q * (constraint / q_norm)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def constraint_of(alpha: float | None, out_dim: int) -> float | None:
    """LyCORIS stores the constraint per unit output; the cap is alpha·out."""
    a = as_alpha(alpha)
    return None if a is None or a < 0 else a * out_dim


def merge(base: Tensor, tensors: Tensors, alpha: float | None = None, multiplier: float = 1.0) -> Tensor:
    import torch

    w0 = f32(base)
    blocks = f32(tensors["oft_blocks"])
    n, b, _ = blocks.shape
    r = cayley(blocks, constraint_of(alpha, w0.shape[0]))
    eye = torch.eye(b, dtype=r.dtype, device=r.device)
    r = multiplier * r + (1.0 - multiplier) * eye
    w = torch.einsum("k n m, k n ... -> k m ...", r, w0.reshape(n, b, *w0.shape[1:]))
    w = w.reshape(w0.shape)
    if "rescale" in tensors:
        w = w * f32(tensors["rescale"]).reshape(-1, *([1] * (w0.dim() - 1)))
    return w


def blocks_shape(shapes: Shapes, base: tuple[int, ...] | None, dims: int) -> tuple[int, ...] | None:
    """W0's shape; ``oft_blocks`` hold square blocks covering its rows (``rescale``: one per row)."""
    blocks = ndim(shapes, "oft_blocks", dims, dims)
    need(blocks[-1] == blocks[-2], f"oft_blocks {list(blocks)} are not square")
    rows = blocks[-3] * blocks[-1]
    if "rescale" in shapes:
        need(prod(shapes["rescale"]) == rows, f"rescale {list(shapes['rescale'])} does not hold one value per {rows} rows")
    if base is not None:
        need(len(base) >= 1 and base[0] == rows, f"oft_blocks {list(blocks)} cover {rows} rows, not the {list(base)} weight's")
    return base


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    if base is None:
        raise ValueError("OFT's ΔW depends on the base weight; pass base_weight")
    return merge(base, tensors, alpha) - f32(base)


OFT = NetworkType(
    name="oft",
    required=frozenset({"oft_blocks"}),
    optional=frozenset({"rescale"}),
    delta=delta,
    merge=merge,
    needs_base=True,
    delta_shape=lambda shapes, base: blocks_shape(shapes, base, 3),
    accepts=lambda shapes: len(shapes.get("oft_blocks", ())) == 3,
    doc="OFT: block-diagonal orthogonal rotation of W0",
)
