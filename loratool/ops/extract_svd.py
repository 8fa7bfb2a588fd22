"""The linear algebra of ``extract``: ΔW matrices grouped by shape, SVD'd in batches, cut
to each module's rank, split into LoRA factors and measured.

Matrices of one shape and rank cap wait in a group until the group holds ``batch_bytes``
(or all pending groups together hold ``pending_bytes``, when the largest group goes), then
go through one batched SVD (:mod:`loratool.lowrank`): a randomized range finder whose test
matrix is shared by the batch, or an exact economy SVD. Each module then gets its rank
(fixed, or chosen from its singular values and ‖ΔW‖_F), factors ``U·√S`` and ``√S·Vh``,
the optional |value| quantile clamp and the cast to the output dtype; its error is
measured on the factors as cast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from loratool.lowrank import SVD

METHODS = ("randomized", "exact")


@dataclass(frozen=True)
class SolveSettings:
    """How every module is factored."""

    method: str  # randomized | exact
    dynamic: str | None  # ratio | fro | cumulative (None: the fixed rank cap)
    threshold: float | None
    clamp: float | None  # |value| quantile, None: no clamp
    dtype: torch.dtype  # of the factors written
    oversample: int | None = None  # randomized: default max(10, rank)
    power_iters: int = 3


@dataclass
class Solved:
    """One module's factors (CPU, output dtype) and what they keep of its ΔW."""

    index: int
    up: Tensor  # [out, k]
    down: Tensor  # [k, in·kh·kw]
    rank: int
    retained: float  # ‖S_k‖ / ‖ΔW‖_F (before clamp and cast)
    error: float  # ‖ΔW − up·down‖_F / ‖ΔW‖_F of the factors as written


@dataclass
class _Job:
    index: int
    delta: Tensor
    cap: int
    norm_sq: float


@dataclass
class Batcher:
    """Collects ΔW matrices and factors them in same-shape batches with bounded memory."""

    settings: SolveSettings
    batch_bytes: int
    pending_bytes: int
    _groups: dict[tuple[int, int, int], list[_Job]] = field(default_factory=dict)
    _pending: int = 0
    batches: int = 0  # SVD calls made

    def add(self, index: int, delta: Tensor, cap: int, norm_sq: float) -> list[Solved]:
        """Queue one ΔW ``[out, in·kh·kw]`` (float32, on the compute device) with its rank
        cap and ‖ΔW‖²; returns whatever batches this completes."""
        key = (delta.shape[0], delta.shape[1], cap)
        group = self._groups.setdefault(key, [])
        group.append(_Job(index, delta, cap, norm_sq))
        size = delta.numel() * 4
        self._pending += size
        done: list[Solved] = []
        if len(group) * size >= self.batch_bytes:
            done += self._run(key)
        while self._pending > self.pending_bytes and self._groups:
            largest = max(self._groups, key=lambda k: len(self._groups[k]) * k[0] * k[1])
            done += self._run(largest)
        return done

    def flush(self) -> list[Solved]:
        """Factor everything still waiting."""
        done: list[Solved] = []
        for key in list(self._groups):
            done += self._run(key)
        return done

    def _run(self, key: tuple[int, int, int]) -> list[Solved]:
        jobs = self._groups.pop(key)
        self._pending -= sum(j.delta.numel() * 4 for j in jobs)
        self.batches += 1
        return solve(jobs, self.settings)


def solve(jobs: list[_Job], s: SolveSettings) -> list[Solved]:
    """Factor one batch of same-shaped ΔW matrices sharing a rank cap."""
    import torch

    from loratool.lowrank import SVD, exact_svd, randomized_svd

    a = jobs[0].delta.unsqueeze(0) if len(jobs) == 1 else torch.stack([j.delta for j in jobs])
    cap = jobs[0].cap
    if s.method == "exact":
        svd = exact_svd(a)  # the whole spectrum: also what the dynamic methods need
    else:
        svd = randomized_svd(a, cap, oversample=s.oversample, power_iters=s.power_iters)
    out = []
    for b, job in enumerate(jobs):
        one = SVD(svd.U[b], svd.S[b], svd.Vh[b])
        out.append(_factor(job, one, a[b], cap, s))
    return out


def _factor(job: _Job, svd: SVD, delta: Tensor, cap: int, s: SolveSettings) -> Solved:
    """One module's rank, factors (clamped, cast) and error; ``delta`` is overwritten."""
    import torch

    from loratool.lowrank import clamp_quantile, retention, select_rank, split_factors

    S = svd.S
    if s.dynamic is not None:
        k = select_rank(S, s.dynamic, s.threshold, cap, total_sq=job.norm_sq)
    else:
        k = min(cap, int(S.shape[-1]))
    kept = retention(S, k, total_sq=job.norm_sq)
    up, down = split_factors(svd, k)
    if s.clamp is not None:
        up, down = clamp_quantile(up, down, s.clamp)
    up, down = up.to(s.dtype), down.to(s.dtype)
    norm = job.norm_sq**0.5
    if norm > 0:  # ΔW is not needed any more: the residual overwrites it
        error = torch.linalg.norm(delta.addmm_(up.float(), down.float(), alpha=-1.0)).item() / norm
    else:
        error = 0.0
    return Solved(job.index, up.cpu(), down.cpu(), k, kept.fro, error)
