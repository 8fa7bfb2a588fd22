"""``loratool.lowrank``: each SVD against a full ``torch.linalg.svd`` of the formed matrix
in float64 (the independent oracle), randomized error against the Eckart–Young optimum,
batched against per-matrix calls, rank selection against hand-computed ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.lowrank import (
    abs_quantile,
    clamp_quantile,
    exact_svd,
    fold_scale,
    product_norm,
    product_svd,
    product_svdvals,
    randomized_svd,
    retention,
    select_rank,
    split_factors,
    stack_factors,
    truncated_svd,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _oracle(a: torch.Tensor) -> torch.return_types.linalg_svd:
    return torch.linalg.svd(a.to(F64), full_matrices=False)


def _best(a: torch.Tensor, k: int, oracle: torch.return_types.linalg_svd | None = None) -> torch.Tensor:
    """Eckart–Young: the best rank-k approximation, from the float64 SVD."""
    u, s, vh = oracle if oracle is not None else _oracle(a)
    return (u[:, :k] * s[:k]) @ vh[:k]


# --------------------------------------------------------------------------- factored SVD


@pytest.mark.parametrize("m,n,r", [(320, 768, 8), (1280, 320, 64), (40, 30, 64), (3, 500, 2)])
def test_product_svd_equals_full_svd_of_the_formed_matrix(m: int, n: int, r: int) -> None:
    g = _gen(m + n + r)
    up, down = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g) * 0.01
    formed = up.to(F64) @ down.to(F64)
    s_ref = torch.linalg.svdvals(formed)
    got = product_svd(up, down)
    k = min(m, n, r)
    assert got.S.shape == (k,) and got.U.shape == (m, k) and got.Vh.shape == (k, n)
    tol = 1e-5 * s_ref[0].item()
    assert torch.allclose(got.S.to(F64), s_ref[:k], atol=tol, rtol=0)
    assert (got.matrix().to(F64) - formed).abs().max().item() < tol
    eye = torch.eye(k, dtype=torch.float32)
    assert torch.allclose(got.U.mT @ got.U, eye, atol=1e-5) and torch.allclose(got.Vh @ got.Vh.mT, eye, atol=1e-5)
    assert torch.allclose(product_svdvals(up, down), got.S, atol=tol, rtol=0)


def test_sum_of_products_with_mixed_ranks_and_signs() -> None:
    g = _gen(1)
    terms = [(torch.randn(320, r, generator=g), torch.randn(r, 1024, generator=g), w) for r, w in ((4, 0.7), (16, -1.3), (8, 2.0))]
    formed = sum(w * u.to(F64) @ d.to(F64) for u, d, w in terms)
    up, down = stack_factors([fold_scale(u, d, w) for u, d, w in terms])
    assert up.shape == (320, 28) and down.shape == (28, 1024)
    got = product_svd(up, down)
    oracle = _oracle(formed)
    ref = oracle.S
    assert torch.allclose(got.S.to(F64), ref[:28], atol=1e-5 * ref[0].item(), rtol=0)
    for k in (1, 5, 20):
        up_k, down_k = split_factors(got, k)
        err = torch.linalg.norm(up_k.to(F64) @ down_k.to(F64) - _best(formed, k, oracle))
        assert err.item() < 1e-5 * torch.linalg.norm(formed).item()


def test_product_norm_has_no_cancellation() -> None:
    g = _gen(2)
    u, d = torch.randn(1280, 32, generator=g), torch.randn(32, 1280, generator=g)
    exact = torch.linalg.norm(u.to(F64) @ d.to(F64)).item()
    assert abs(product_norm(u, d).item() - exact) < 1e-6 * exact
    # the norm of a difference of two nearly equal products, from the stacked factors
    tiny = 1e-4 * torch.randn(1280, 32, generator=g)
    exact_diff = torch.linalg.norm(tiny.to(F64) @ d.to(F64)).item()
    up, down = stack_factors([(u + tiny, d), (-u, d)])
    assert abs(product_norm(up, down).item() - exact_diff) < 1e-3 * exact_diff


def test_product_svd_batched_and_half_inputs() -> None:
    g = _gen(3)
    ups, downs = torch.randn(5, 320, 16, generator=g), torch.randn(5, 16, 320, generator=g)
    batched = product_svd(ups.half(), downs.half())
    assert batched.S.dtype == torch.float32
    for i in range(5):
        one = product_svd(ups[i].half(), downs[i].half())
        assert torch.allclose(batched.S[i], one.S, rtol=1e-5, atol=1e-4)
        assert torch.allclose(batched.truncate(4).matrix()[i], one.truncate(4).matrix(), atol=1e-4)


# --------------------------------------------------------------------------- dense SVDs


def _planted(m: int, n: int, r: int, noise: float, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) * 0.1 + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("m,n,r,k", [(640, 960, 64, 32), (320, 2880, 128, 32), (1280, 320, 200, 16)])
def test_randomized_svd_within_one_percent_of_the_optimum(m: int, n: int, r: int, k: int) -> None:
    a = _planted(m, n, r, noise=0.01, seed=m + r)
    optimum = torch.linalg.norm(a.to(F64) - _best(a, k)).item()
    got = randomized_svd(a, k)
    err = torch.linalg.norm(a.to(F64) - got.matrix().to(F64)).item()
    assert err <= 1.01 * optimum, err / optimum
    assert got.S[0].item() == pytest.approx(torch.linalg.svdvals(a.to(F64))[0].item(), rel=1e-2)


def test_randomized_svd_recovers_an_exact_low_rank_matrix() -> None:
    a = _planted(1000, 700, 24, noise=0.0, seed=5)
    got = randomized_svd(a, 24, oversample=6, power_iters=1)
    assert (got.matrix() - a).abs().max().item() < 1e-5 * a.abs().max().item()


def test_exact_svd_is_economy_and_truncates() -> None:
    a = _planted(200, 600, 50, noise=0.01, seed=6)
    got = exact_svd(a, 20)
    assert got.U.shape == (200, 20) and got.Vh.shape == (20, 600)
    err = torch.linalg.norm(a.to(F64) - got.matrix().to(F64)).item()
    assert abs(err - torch.linalg.norm(a.to(F64) - _best(a, 20)).item()) < 1e-4 * err
    assert exact_svd(a).S.shape == (200,)


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_batched_equals_unbatched(method: str) -> None:
    batch = torch.stack([_planted(320, 640, 48, 0.01, seed) for seed in range(3)])
    together = truncated_svd(batch, 16, method)
    for i in range(3):
        alone = truncated_svd(batch[i], 16, method)
        assert torch.allclose(together.S[i], alone.S, rtol=1e-4)
        assert torch.allclose(together.matrix()[i], alone.matrix(), atol=1e-4 * alone.matrix().abs().max().item())


def test_randomized_svd_is_deterministic_and_small_matrices_fall_back_to_exact() -> None:
    a = _planted(200, 300, 40, 0.01, seed=7)
    one, two = randomized_svd(a, 8, seed=3), randomized_svd(a, 8, seed=3)
    assert torch.equal(one.S, two.S) and torch.equal(one.U, two.U)
    small = randomized_svd(a[:16], 8)  # a sketch of 8 + 10 columns ≥ 16 rows: exact SVD
    assert torch.allclose(small.S, exact_svd(a[:16], 8).S, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown SVD method"):
        truncated_svd(a, 4, "lanczos")


# --------------------------------------------------------------------------- rank selection

SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "method,threshold,cap,expected",
    [
        # ratio: keep σ ≥ σ₀/t. t=2 → σ ≥ 4: {8, 4}; t=8 → σ ≥ 1: {8, 4, 2, 1, 1}; t=1 → {8}.
        ("ratio", 2.0, None, 2),
        ("ratio", 8.0, None, 5),
        ("ratio", 1.0, None, 1),
        ("ratio", 8.0, 3, 3),
        # fro: Σσ² = 64+16+4+1+1 = 86. k=1 keeps 64/86 (√ = 0.8627); k=2 keeps 80/86 (0.96448);
        # k=3 keeps 84/86 (0.9883); k=4 keeps 85/86 (0.9942).
        ("fro", 0.86, None, 1),
        ("fro", 0.87, None, 2),
        ("fro", 0.9644, None, 2),
        ("fro", 0.9645, None, 3),
        ("fro", 0.99, None, 4),
        ("fro", 1.0, None, 5),
        # cumulative: Σσ = 16: 8/16 = 0.5, 12/16 = 0.75, 14/16, 15/16, 16/16.
        ("cumulative", 0.5, None, 1),
        ("cumulative", 0.75, None, 2),
        ("cumulative", 0.76, None, 3),
        ("cumulative", 1.0, None, 5),
        ("cumulative", 1.0, 2, 2),
    ],
)
def test_select_rank_on_a_constructed_spectrum(method: str, threshold: float, cap: int | None, expected: int) -> None:
    assert select_rank(SPECTRUM, method, threshold, cap) == expected


def test_select_rank_fixed_zero_and_partial_spectra() -> None:
    assert select_rank(SPECTRUM, max_rank=4) == 4
    assert select_rank(SPECTRUM, max_rank=40) == 6
    assert select_rank(torch.zeros(5), "fro", 0.9) == 1
    # a partial spectrum (randomized SVD) with the true ‖ΔW‖² given: 64+16 of 100 kept → √0.8 = 0.894
    assert select_rank(torch.tensor([8.0, 4.0]), "fro", 0.89, total_sq=100.0) == 2
    assert select_rank(torch.tensor([8.0, 4.0]), "fro", 0.9, total_sq=100.0) == 2  # capped by what is known
    for method, bad in (("ratio", 0.5), ("fro", 0.0), ("fro", 1.5), ("cumulative", float("nan")), ("sv_fro", 0.5)):
        with pytest.raises(ValueError):
            select_rank(SPECTRUM, method, bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=40), st.floats(0.05, 1.0), st.sampled_from(["fro", "cumulative"]))
def test_dynamic_rank_is_the_smallest_that_reaches_the_threshold(values: list[float], t: float, method: str) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=F64)
    k = select_rank(s, method, t)
    power = 2 if method == "fro" else 1
    total = (s**power).sum().item()
    if total == 0:
        assert k == 1
        return

    def share(j: int) -> float:
        kept = (s[:j] ** power).sum().item() / total
        return kept ** (1 / power)

    assert share(k) >= t * (1 - 1e-12)
    assert k == 1 or share(k - 1) < t


def test_retention_hand_computed() -> None:
    r = retention(torch.tensor([4.0, 3.0]), 1)
    assert r.fro == pytest.approx(0.8) and r.error == pytest.approx(0.6)
    assert r.norm == pytest.approx(5.0) and r.tail == pytest.approx(3.0)
    assert retention(torch.tensor([4.0, 3.0]), 2).error == 0.0
    assert retention(torch.zeros(3), 1).fro == 1.0
    # partial spectrum: ‖ΔW‖² = 25 known, 16 kept
    assert retention(torch.tensor([4.0]), 1, total_sq=25.0).error == pytest.approx(0.6)


# --------------------------------------------------------------------------- factors


def test_split_factors_balance_the_singular_values() -> None:
    a = _planted(500, 300, 10, 0.0, seed=8)
    svd = exact_svd(a)
    up, down = split_factors(svd, 10)
    assert (up @ down - a).abs().max().item() < 1e-4 * a.abs().max().item()
    # column i of up and row i of down both have norm √σᵢ
    assert torch.allclose(torch.linalg.norm(up, dim=0), svd.S[:10].sqrt(), rtol=1e-4)
    assert torch.allclose(torch.linalg.norm(down, dim=1), svd.S[:10].sqrt(), rtol=1e-4)


def test_fold_scale_keeps_negative_scales() -> None:
    g = _gen(9)
    u, d = torch.randn(30, 4, generator=g), torch.randn(4, 20, generator=g)
    for s in (-2.5, 0.25, -1e-3):
        fu, fd = fold_scale(u, d, s)
        assert torch.allclose(fu @ fd, s * (u @ d), atol=1e-5 * abs(s) * (u @ d).abs().max().item())


def test_abs_quantile_matches_numpy_and_passes_torch_limit() -> None:
    g = _gen(10)
    x = torch.randn(10_001, generator=g)
    for q in (0.0, 0.5, 0.99, 1.0):
        assert abs_quantile(x, q).item() == pytest.approx(float(np.quantile(x.abs().numpy(), q)), rel=1e-6)
    big = torch.randn(17_000_000, generator=g)
    with pytest.raises(RuntimeError):
        torch.quantile(big.abs(), 0.99)
    assert abs_quantile([big[:9_000_000], big[9_000_000:]], 0.99).item() == pytest.approx(
        float(np.quantile(big.abs().numpy(), 0.99)), rel=1e-6
    )


def test_clamp_quantile_clamps_both_factors_symmetrically() -> None:
    up = torch.tensor([[1.0, -5.0], [2.0, 0.5]])
    down = torch.tensor([[-3.0, 4.0], [0.1, -0.2]])
    cu, cd = clamp_quantile(up, down, 0.75)
    hi = float(np.quantile(np.abs(np.concatenate([up.numpy().ravel(), down.numpy().ravel()])), 0.75))
    assert cu.abs().max().item() <= hi + 1e-7 and cd.abs().max().item() <= hi + 1e-7
    assert hi == pytest.approx(3.25)  # |values| sorted: 0.1 0.2 0.5 1 2 3 4 5; position 0.75·7 = 5.25
    assert cu[0, 1].item() == pytest.approx(-hi) and cd[0, 1].item() == pytest.approx(hi)
    assert cd[0, 0].item() == -3.0
    assert cu[0, 0].item() == 1.0
