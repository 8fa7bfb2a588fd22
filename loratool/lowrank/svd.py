"""SVDs for low-rank work: of a factored product (exact, cheap), randomized, exact economy.

Every function computes in float32 on the device of its inputs and accepts batched
inputs ``[..., m, n]`` (``torch.linalg.qr``/``svd`` batch over leading dims).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

F32 = torch.float32
METHODS = ("randomized", "exact")


class SVD(NamedTuple):
    """``U [..., m, k]``, ``S [..., k]`` (descending, ≥ 0), ``Vh [..., k, n]``."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    def truncate(self, k: int) -> SVD:
        """The leading ``k`` singular triplets."""
        return SVD(self.U[..., :k], self.S[..., :k], self.Vh[..., :k, :])

    def matrix(self) -> Tensor:
        """``U · diag(S) · Vh`` (forms the matrix: for tests and small cases)."""
        return (self.U * self.S.unsqueeze(-2)) @ self.Vh


def stack_factors(pairs: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``Σ upᵢ @ downᵢ`` as one product ``[up₁ up₂ …] @ [down₁; down₂; …]`` (float32).

    ``upᵢ [..., m, rᵢ]`` and ``downᵢ [..., rᵢ, n]``; ranks may differ."""
    if not pairs:
        raise ValueError("no factors to stack")
    ups = [u.to(F32) for u, _ in pairs]
    downs = [d.to(F32) for _, d in pairs]
    for u, d in zip(ups, downs):
        if u.shape[-1] != d.shape[-2] or u.shape[-2] != ups[0].shape[-2] or d.shape[-1] != downs[0].shape[-1]:
            raise ValueError(f"factor shapes do not chain: {tuple(u.shape)} @ {tuple(d.shape)}")
    if len(pairs) == 1:
        return ups[0], downs[0]
    return torch.cat(ups, dim=-1), torch.cat(downs, dim=-2)


def _core(up: Tensor, down: Tensor, with_q: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``up @ down = Qu · core · Qdᵀ`` with ``up = Qu·Ru``, ``downᵀ = Qd·Rd``, ``core = Ru·Rdᵀ``.

    ``core`` is ``min(m, r) × min(n, r)``; with ``with_q=False`` the Q factors are not
    formed (empty tensors)."""
    mode = "reduced" if with_q else "r"
    qu, ru = torch.linalg.qr(up.to(F32), mode=mode)
    qd, rd = torch.linalg.qr(down.to(F32).mT, mode=mode)
    return qu, ru @ rd.mT, qd


def product_svd(up: Tensor, down: Tensor) -> SVD:
    """Exact SVD of ``up @ down`` (``[..., m, r] @ [..., r, n]``) without forming it.

    QR of ``up`` and of ``downᵀ``, then an SVD of the ``r × r`` core: cost O((m + n)·r²)
    instead of O(m·n·min(m, n)). Returns ``min(m, n, r)`` triplets. For a sum of
    products, pass :func:`stack_factors` of them."""
    qu, core, qd = _core(up, down, with_q=True)
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return SVD(qu @ uc, s, vhc @ qd.mT)


def product_svdvals(up: Tensor, down: Tensor) -> Tensor:
    """Singular values of ``up @ down`` (descending), without forming it or any Q factor."""
    _, core, _ = _core(up, down, with_q=False)
    return torch.linalg.svdvals(core)


def product_norm(up: Tensor, down: Tensor) -> Tensor:
    """Frobenius norm of ``up @ down`` without forming it (``‖Ru·Rdᵀ‖_F``); no cancellation,
    so the norm of a difference ``[U₁ −U₂] @ [D₁; D₂]`` is accurate even when tiny."""
    _, core, _ = _core(up, down, with_q=False)
    return torch.linalg.matrix_norm(core)


def exact_svd(a: Tensor, rank: int | None = None) -> SVD:
    """Economy SVD (``full_matrices=False``) of ``a [..., m, n]``, truncated to ``rank``."""
    u, s, vh = torch.linalg.svd(a.to(F32), full_matrices=False)
    result = SVD(u, s, vh)
    return result if rank is None else result.truncate(rank)


def randomized_svd(
    a: Tensor, rank: int, *, oversample: int | None = None, power_iters: int = 3, seed: int = 0
) -> SVD:
    """Truncated SVD of ``a [..., m, n]`` by a randomized range finder.

    Halko, Martinsson & Tropp (2011), algorithms 4.4 and 5.1: sketch the range with a
    Gaussian test matrix of ``rank + oversample`` columns (default oversample:
    ``max(10, rank)``, i.e. a sketch twice the rank), refine it with ``power_iters``
    power iterations re-orthonormalised by QR after every product (stable even for flat
    spectra), then take the exact SVD of the small projection ``Qᵀ·a``. One test matrix
    is shared across the batch, so a batched call equals per-matrix calls. Deterministic
    for a given ``seed``. Falls back to :func:`exact_svd` when the sketch would be as
    wide as the matrix.

    Accuracy measured on planted rank-64 (and rank-128, -400) + noise matrices cut to
    rank 32, the hard case of a flat spectrum at the cut: Frobenius error within 0.4 % of
    the Eckart–Young optimum with the defaults (1–2 % with oversample 10 and 2 iterations).
    """
    a = a.to(F32)
    m, n = a.shape[-2:]
    k = min(rank, m, n)
    width = min(k + (max(10, k) if oversample is None else oversample), m, n)
    if width >= min(m, n):
        return exact_svd(a, k)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, device=a.device, dtype=F32)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(a.mT @ q).Q
        q = torch.linalg.qr(a @ z).Q
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return SVD(q @ ub, s, vh).truncate(k)


def truncated_svd(
    a: Tensor, rank: int, method: str = "randomized", *, oversample: int | None = None,
    power_iters: int = 3, seed: int = 0,
) -> SVD:
    """The leading ``rank`` singular triplets of ``a`` by ``method`` ("randomized" or "exact")."""
    if method == "exact":
        return exact_svd(a, rank)
    if method == "randomized":
        return randomized_svd(a, rank, oversample=oversample, power_iters=power_iters, seed=seed)
    raise ValueError(f"unknown SVD method {method!r}; choose from {', '.join(METHODS)}")
