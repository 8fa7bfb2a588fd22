"""BOFT (LyCORIS): m butterfly stages of block rotations applied to W0's rows.

``oft_blocks [m, n, b, b]`` (n·b = out), optional ``rescale``, ``alpha`` a constraint as
in OFT. Stage i groups rows by a butterfly permutation of stride k = 2^i·b/2 (rows
``(g, j, t)`` with g∈{0,1}, t<k become block-adjacent), rotates each block by R_i (y = R x),
and undoes the permutation. With multiplier m each stage is m·R_i + (1 − m)·I.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, f32, need
from loratool.networks.oft import blocks_shape, cayley, constraint_of

if TYPE_CHECKING:
    from torch import Tensor


def butterfly_perm(out_dim: int, k: int) -> Tensor:
    """Row order that makes rows ``(c, g, t)`` of stride k adjacent as ``(c, t, g)``."""
    import torch

    return torch.arange(out_dim).reshape(-1, 2, k).transpose(1, 2).reshape(-1)


def merge(base: Tensor, tensors: Tensors, alpha: float | None = None, multiplier: float = 1.0) -> Tensor:
    import torch

    w0 = f32(base)
    blocks = f32(tensors["oft_blocks"])
    stages, n, b, _ = blocks.shape
    r = cayley(blocks, constraint_of(alpha, w0.shape[0]))
    eye = torch.eye(b, dtype=r.dtype, device=r.device)
    w = w0
    for i in range(stages):
        r_i = multiplier * r[i] + (1.0 - multiplier) * eye
        perm = butterfly_perm(w0.shape[0], (2**i) * (b // 2)).to(w0.device)
        x = w[perm].reshape(n, b, *w0.shape[1:])
        x = torch.einsum("k i j, k j ... -> k i ...", r_i, x).reshape(w0.shape)
        w = torch.empty_like(x)
        w[perm] = x
    if "rescale" in tensors:
        w = w * f32(tensors["rescale"]).reshape(-1, *([1] * (w0.dim() - 1)))
    return w


def delta_shape(shapes: Shapes, base: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """As OFT, and stage i pairs rows at stride 2^i·b/2: b even, n divisible by 2^(m−1)."""
    result = blocks_shape(shapes, base, 4)
    stages, n, b, _ = shapes["oft_blocks"]
    need(stages >= 1 and b % 2 == 0 and n % 2 ** (stages - 1) == 0, f"oft_blocks {list(shapes['oft_blocks'])} do not form a butterfly")
    return result


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    if base is None:
        raise ValueError("BOFT's ΔW depends on the base weight; pass base_weight")
    return merge(base, tensors, alpha) - f32(base)


BOFT = NetworkType(
    name="boft",
    required=frozenset({"oft_blocks"}),
    optional=frozenset({"rescale"}),
    delta=delta,
    merge=merge,
    needs_base=True,
    delta_shape=delta_shape,
    accepts=lambda shapes: len(shapes.get("oft_blocks", ())) == 4,
    doc="BOFT: butterfly orthogonal rotation of W0",
)
