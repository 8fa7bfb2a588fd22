"""Choosing a rank from singular values, and what a truncation keeps.

With singular values σ₀ ≥ σ₁ ≥ … ≥ 0 of ΔW and a threshold t, the dynamic methods keep
the smallest k that satisfies:

=============  =========================================  ==========================
method         condition on the kept σ₀ … σ_{k−1}         threshold
=============  =========================================  ==========================
``ratio``      every kept σᵢ ≥ σ₀ / t (k = #{σᵢ ≥ σ₀/t})   t ≥ 1
``fro``        √(Σ_{i<k} σᵢ² / Σ σᵢ²) ≥ t                 0 < t ≤ 1
``cumulative`` Σ_{i<k} σᵢ / Σ σᵢ ≥ t                      0 < t ≤ 1
=============  =========================================  ==========================

``fro`` is the retained Frobenius norm ‖ΔW_k‖_F / ‖ΔW‖_F, the quantity kohya's
``sv_fro`` tests (it compares the cumulative σ² share with t²); ``cumulative`` is kohya's
``sv_cumulative`` and ``ratio`` its ``sv_ratio``. Unlike kohya's resize, k is exactly the
count these conditions give — no extra +1 (PEERS-kohya.md §3). k is then capped by
``max_rank`` and the number of singular values, and is at least 1 (an all-zero ΔW keeps 1).

Selection runs in float64 on the CPU: the spectra are short, and exact comparisons
make hand-computed ranks reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

RANK_METHODS = ("ratio", "fro", "cumulative")


def check_threshold(method: str, threshold: float) -> None:
    """Raise ValueError unless ``threshold`` is valid for ``method``."""
    if method not in RANK_METHODS:
        raise ValueError(f"unknown rank method {method!r}; choose from {', '.join(RANK_METHODS)}")
    if not math.isfinite(threshold):
        raise ValueError(f"{method} threshold must be a finite number, got {threshold}")
    if method == "ratio" and threshold < 1:
        raise ValueError(f"ratio threshold must be ≥ 1 (keep σ ≥ σ₀/t), got {threshold}")
    if method in ("fro", "cumulative") and not 0 < threshold <= 1:
        raise ValueError(f"{method} threshold must be in (0, 1], got {threshold}")


def _spectrum(s: Tensor) -> list[float]:
    return s.detach().to("cpu", torch.float64).clamp_min(0).tolist()


def _first_reaching(cumulative: list[float], target: float) -> int:
    """Smallest k with cumulative[k−1] ≥ target (len + 1 when never reached)."""
    return next((i + 1 for i, c in enumerate(cumulative) if c >= target), len(cumulative) + 1)


def select_rank(
    s: Tensor,
    method: str | None = None,
    threshold: float | None = None,
    max_rank: int | None = None,
    *,
    total_sq: float | None = None,
) -> int:
    """The rank to keep for singular values ``s`` (1-D, descending).

    ``method=None`` is a fixed rank: ``max_rank`` (required), capped by ``len(s)``.
    Otherwise one of :data:`RANK_METHODS` with ``threshold`` (module docstring), capped
    by ``max_rank`` when given. ``total_sq`` is ‖ΔW‖_F² when ``s`` is only the leading
    part of the spectrum (a randomized SVD); it defaults to Σσ². ``cumulative`` always
    uses Σσ of the values given."""
    n = int(s.shape[-1])
    if n == 0:
        raise ValueError("no singular values")
    if method is None:
        if max_rank is None or max_rank < 1:
            raise ValueError("a fixed rank needs max_rank ≥ 1")
        return min(max_rank, n)
    if threshold is None:
        raise ValueError(f"{method} needs a threshold")
    check_threshold(method, threshold)
    sv = _spectrum(s)
    k = _dynamic(sv, method, threshold, total_sq)
    if max_rank is not None:
        k = min(k, max_rank)
    return max(1, min(k, n))


def _dynamic(sv: list[float], method: str, t: float, total_sq: float | None) -> int:
    if sv[0] == 0.0:
        return 1
    if method == "ratio":
        floor = sv[0] / t
        return sum(1 for x in sv if x >= floor)
    if method == "fro":
        cum = list(accumulate(x * x for x in sv))
        total = cum[-1] if total_sq is None else max(total_sq, cum[-1])
        return _first_reaching(cum, t * t * total)
    cum = list(accumulate(sv))
    return _first_reaching(cum, t * cum[-1])



@dataclass(frozen=True)
class Retention:
    """What keeping k of the singular values keeps, relative to the whole ΔW."""

    fro: float  # ‖ΔW_k‖_F / ‖ΔW‖_F
    error: float  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F (the optimum, Eckart–Young)
    norm: float  # ‖ΔW‖_F
    tail: float  # ‖ΔW − ΔW_k‖_F (absolute)


def retention(s: Tensor, k: int, *, total_sq: float | None = None) -> Retention:
    """Retained Frobenius norm and relative error of keeping the first ``k`` of ``s``.

    ``total_sq`` (‖ΔW‖_F²) when ``s`` is a partial spectrum. The error is summed from
    the tail itself (not 1 − kept²), so it stays accurate when it is tiny."""
    sv = _spectrum(s)
    kept = sum(x * x for x in sv[:k])
    tail = sum(x * x for x in sv[k:])
    if total_sq is not None:
        tail = max(total_sq - kept, tail)
    total = kept + tail
    if total == 0.0:
        return Retention(1.0, 0.0, 0.0, 0.0)
    return Retention(math.sqrt(kept / total), math.sqrt(tail / total), math.sqrt(total), math.sqrt(tail))
