"""Numerical core of STAT: IDs (QR and Gram routes), sketches, block selection, folding.

Every check compares against a reference: the dense error computed directly, a
brute-force least-squares projection, or an exactly representable (low-rank) case.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tshrink_plugins.stat.idecomp import (
    GramAccumulator,
    block_columns,
    fold_interpolation,
    id_from_gram,
    interpolative_decomposition,
    least_squares_fold,
    select_blocks,
)
from tshrink_plugins.stat.sketch import CountSketch, GaussianSketch, SketchConfig, default_sketch_size

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def low_rank_plus_noise(m: int, n: int, r: int, noise: float, seed: int = 0) -> torch.Tensor:
    """(m, n) with r singular values decaying from sqrt(m) to sqrt(m)/100, plus Gaussian noise."""
    g = _gen(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0]
    s = torch.logspace(0, -2, r, dtype=F64) * math.sqrt(m)
    return (U * s) @ V.T + noise * torch.randn(m, n, generator=g, dtype=F64)


def exact_rank(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)


def id_error(A: torch.Tensor, cols: torch.Tensor, T: torch.Tensor, ord: int | str = 2) -> float:
    return float(torch.linalg.matrix_norm(A - A[:, cols] @ T, ord=ord))


# -- QR route ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 8, 15])
def test_id_error_bounds_on_low_rank_plus_noise(k: int) -> None:
    A = low_rank_plus_noise(80, 40, r=12, noise=1e-2)
    m, n = A.shape
    d = interpolative_decomposition(A, k)
    sigma = torch.linalg.svdvals(A)
    assert d.cols.tolist() == d.pivots[:k].tolist()
    torch.testing.assert_close(d.T[:, d.cols], torch.eye(k, dtype=F64))
    spec = id_error(A, d.cols, d.T, 2)
    # residuals[k] is the exact Frobenius error, hence >= spectral and <= sqrt(min(m,n)-k) x spectral
    assert abs(float(d.residuals[k]) - id_error(A, d.cols, d.T, "fro")) <= 1e-10 * float(d.residuals[0])
    assert spec <= float(d.residuals[k]) * (1 + 1e-10)
    assert float(d.residuals[k]) <= math.sqrt(min(m, n) - k) * spec
    # classical ID bound
    assert spec <= math.sqrt(1 + k * (n - k)) * float(sigma[k])


def test_residuals_match_direct_errors_for_every_rank() -> None:
    A = low_rank_plus_noise(30, 12, r=6, noise=1e-2, seed=1)
    full = interpolative_decomposition(A, 12)
    res = full.residuals
    assert res.shape == (13,)
    assert torch.all(res[1:] <= res[:-1])
    assert float(res[0]) == pytest.approx(float(torch.linalg.matrix_norm(A)), rel=1e-12)
    assert float(res[-1]) == 0.0
    for r in range(13):
        d = interpolative_decomposition(A, r)
        assert d.pivots.tolist() == full.pivots.tolist()
        assert float(res[r]) == pytest.approx(id_error(A, d.cols, d.T, "fro"), rel=1e-9, abs=1e-12)


def test_id_exact_for_rank_k_matrix() -> None:
    A = exact_rank(50, 30, 7)
    d = interpolative_decomposition(A, 7)
    assert id_error(A, d.cols, d.T, "fro") <= 1e-8 * float(torch.linalg.matrix_norm(A))
    assert d.numerical_rank == 7
    assert interpolative_decomposition(A, rtol=1e-10).k == 7


def test_rtol_picks_smallest_rank_meeting_the_tolerance() -> None:
    A = low_rank_plus_noise(60, 30, r=10, noise=1e-3, seed=2)
    norm2 = float(torch.linalg.matrix_norm(A, 2))
    for rtol in (0.3, 0.05, 0.01):
        d = interpolative_decomposition(A, rtol=rtol)
        assert float(d.residuals[d.k]) <= rtol * norm2
        assert d.k == 0 or float(d.residuals[d.k - 1]) > rtol * norm2
        assert id_error(A, d.cols, d.T, 2) <= rtol * norm2


def test_float32_input_comes_back_float32_and_does_not_modify_input() -> None:
    A = low_rank_plus_noise(20, 10, r=4, noise=1e-2).float()
    A_before = A.clone()
    d = interpolative_decomposition(A, 4)
    assert d.T.dtype == torch.float32 and d.residuals.dtype == torch.float32 and d.cols.dtype == torch.long
    assert torch.equal(A, A_before)
    A64 = A.double()  # float64 CPU input must not be overwritten by LAPACK either
    interpolative_decomposition(A64, 4)
    assert torch.equal(A64, A_before.double())


def test_rank_deficient_requests_give_finite_exact_ids() -> None:
    A = exact_rank(40, 20, 3, seed=3)
    A[:, 5] = A[:, 2]  # duplicate column
    for k in (3, 6, 20):
        d = interpolative_decomposition(A, k)
        assert torch.isfinite(d.T).all() and torch.isfinite(d.residuals).all()
        torch.testing.assert_close(d.T[:, d.cols], torch.eye(k, dtype=F64))
        assert id_error(A, d.cols, d.T, "fro") <= 1e-8 * float(torch.linalg.matrix_norm(A))
        assert d.numerical_rank == 3
    Z = torch.zeros(6, 4, dtype=F64)
    d = interpolative_decomposition(Z, 2)
    assert torch.isfinite(d.T).all() and float(d.residuals.abs().max()) == 0.0
    assert interpolative_decomposition(Z, rtol=0.1).k == 0
    g = id_from_gram(Z.T @ Z, 2)
    assert torch.isfinite(g.T).all() and g.numerical_rank == 0


# -- Gram route -------------------------------------------------------------------------
def test_gram_accumulator_streams_exact_gram() -> None:
    A = low_rank_plus_noise(37, 9, r=4, noise=0.1).float()
    acc = GramAccumulator(9)
    for chunk in A.split(10):
        acc.update(chunk)
    acc.update(A[:6].reshape(2, 3, 9))  # (batch, seq, n) is flattened
    A64 = torch.cat([A, A[:6]]).double()
    torch.testing.assert_close(acc.result(), A64.T @ A64, rtol=1e-12, atol=1e-12)
    assert acc.rows == 43 and acc.result().dtype == F64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_path_matches_qr_on_well_conditioned_data(seed: int) -> None:
    # singular values 1 .. 1e-2 (condition 1e2 + noise): pivots agree for every rank
    A = low_rank_plus_noise(200, 24, r=24, noise=1e-3, seed=seed)
    qr = interpolative_decomposition(A, 10)
    gr = id_from_gram(A.T @ A, 10)
    assert gr.pivots.tolist() == qr.pivots.tolist()
    # measured: T differs by < 1e-14, residuals by < 2e-13 relative (Gram squares the condition number)
    torch.testing.assert_close(gr.T, qr.T, rtol=0, atol=1e-9)
    torch.testing.assert_close(gr.residuals, qr.residuals, rtol=1e-7, atol=1e-9 * float(qr.residuals[0]))
    assert id_from_gram(A.T @ A, rtol=0.05).k == interpolative_decomposition(A, rtol=0.05).k


def test_gram_path_rank_deficient_is_finite_and_exact() -> None:
    A = exact_rank(30, 12, 4, seed=5)
    A[:, 7] = 2 * A[:, 1]
    d = id_from_gram(A.T @ A, 8)
    assert d.numerical_rank == 4 and torch.isfinite(d.T).all()
    assert sorted(d.pivots.tolist()) == list(range(12))
    # the Gram route resolves ~sqrt(eps): 1e-6 relative is its exactness here
    assert id_error(A, d.cols, d.T, "fro") <= 1e-6 * float(torch.linalg.matrix_norm(A))
    assert torch.all(d.residuals[1:] <= d.residuals[:-1]) and float(d.residuals[-1]) == 0.0


# -- sketches ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [GaussianSketch, CountSketch])
def test_sketched_id_close_to_exact_id(cls: type) -> None:
    A = low_rank_plus_noise(1500, 32, r=12, noise=1e-2, seed=7)
    for k in (4, 8, 12, 20):
        ref = interpolative_decomposition(A, k)
        exact = id_error(A, ref.cols, ref.T)
        for seed in range(3):
            sk = cls(32, SketchConfig(seed=seed))  # default size: 2n+10 / 4n+10
            for chunk in A.split(400):
                sk.update(chunk)
            d = interpolative_decomposition(sk.result(), k)
            # measured worst ratio over 20 seeds on similar data: 1.45 (Gaussian), 1.20 (CountSketch)
            assert id_error(A, d.cols, d.T) <= 2.0 * exact
        sk = cls(32, SketchConfig(target_rank=k, seed=11))  # small sketch: 2k+10 / 4k+10 rows
        sk.update(A)
        d = interpolative_decomposition(sk.result(), k)
        assert id_error(A, d.cols, d.T) <= 3.0 * exact  # measured worst over 20 seeds: 2.1


def test_sketch_structure_and_determinism() -> None:
    m = 300
    I = torch.eye(m, dtype=F64)  # sketching the identity returns S itself
    cs = CountSketch(m, SketchConfig(size=40, seed=3))
    cs.update(I)
    S = cs.result()
    assert S.shape == (40, m)
    assert torch.equal((S != 0).sum(0), torch.ones(m, dtype=torch.long))  # one entry per column
    assert torch.equal(S.abs().sum(0), torch.ones(m, dtype=F64))  # and it is +-1
    gs = GaussianSketch(m, SketchConfig(size=50, seed=3))
    gs.update(I)
    S = gs.result()
    assert abs(float(S.mean())) < 0.01 and float(S.var()) == pytest.approx(1 / 50, rel=0.1)
    for cls in (GaussianSketch, CountSketch):
        a, b, c = (cls(m, SketchConfig(size=30, seed=s)) for s in (1, 1, 2))
        for sk in (a, b, c):
            sk.update(I[:100])
            sk.update(I[100:])
        assert torch.equal(a.result(), b.result()) and not torch.equal(a.result(), c.result())
    assert default_sketch_size(32, "gaussian") == 74 and default_sketch_size(32, "countsketch", 8) == 42


# -- single-layer pruning ---------------------------------------------------------------
def test_id_fold_beats_plain_deletion_on_held_out_data() -> None:
    g = _gen(8)
    d_in, hidden, out, k = 16, 64, 8, 24
    protos = torch.randn(10, d_in, generator=g, dtype=F64)
    W1 = torch.rand(hidden, 10, generator=g, dtype=F64) @ protos  # correlated hidden units
    W1 = W1 + 0.1 * torch.randn(hidden, d_in, generator=g, dtype=F64)
    W2 = torch.randn(out, hidden, generator=g, dtype=F64)
    X_fit = torch.randn(2000, d_in, generator=g, dtype=F64)
    X_test = torch.randn(1000, d_in, generator=g, dtype=F64)  # held out
    H_fit, H_test = torch.relu(X_fit @ W1.T), torch.relu(X_test @ W1.T)  # (tokens, hidden)
    d = interpolative_decomposition(H_fit, k)
    W2_id = fold_interpolation(W2, d.cols, d.T)  # (out, k)
    W2_cut = W2[:, d.cols]
    Y = H_test @ W2.T

    def rel(Wk: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(Y - H_test[:, d.cols] @ Wk.T) / torch.linalg.matrix_norm(Y))

    # measured over 5 data seeds: corrected/plain = 0.09 .. 0.14, corrected 0.08 .. 0.16
    assert rel(W2_id) < 0.25 * rel(W2_cut) and rel(W2_id) < 0.2
    # the ID's T is the least-squares fit onto the kept columns: both folds agree
    W2_ls = least_squares_fold(H_fit.T @ H_fit, W2, d.cols, damping=0.0)
    torch.testing.assert_close(W2_ls, W2_id, rtol=1e-7, atol=1e-9)


# -- head blocks ------------------------------------------------------------------------
def _projection_residual(target: torch.Tensor, basis: torch.Tensor) -> float:
    """Brute force: ||target - P target||_F with P the projector onto span(basis)."""
    if basis.shape[1] == 0:
        return float(torch.linalg.matrix_norm(target))
    Q, s, _ = torch.linalg.svd(basis, full_matrices=False)
    Q = Q[:, s > 1e-10 * s[0]]
    return float(torch.linalg.matrix_norm(target - Q @ (Q.T @ target)))


def test_select_blocks_picks_independent_blocks_and_matches_brute_force() -> None:
    g = _gen(9)
    bs, m = 4, 100
    ind = [torch.randn(m, bs, generator=g, dtype=F64) * s for s in (1.0, 1.5, 2.0)]  # blocks 0, 2, 3
    mix = lambda *bl: sum(b @ torch.randn(bs, bs, generator=g, dtype=F64) for b in bl) * 0.2  # noqa: E731
    blocks = [ind[0], 0.5 * ind[0], ind[1], ind[2], mix(ind[0], ind[1]), mix(ind[1], ind[2])]
    A = torch.cat(blocks, 1)  # (m, 24)
    sel = select_blocks(A.T @ A, bs, 3)
    assert set(sel.blocks.tolist()) == {0, 2, 3}
    assert sel.cols.tolist() == block_columns(sel.blocks, bs).tolist()
    assert sorted(sel.order.tolist()) == list(range(6))
    # greedy reference: each step maximises the block's residual after projection
    chosen: list[int] = []
    res0 = float(sel.residuals[0])  # Gram route: residuals resolve ~sqrt(eps) of it
    for t, b in enumerate(sel.order.tolist()):
        basis = A[:, block_columns(torch.tensor(chosen, dtype=torch.long), bs)]
        left = [c for c in range(6) if c not in chosen]
        scores = {c: _projection_residual(A[:, c * bs : (c + 1) * bs], basis) for c in left}
        if t < 3:  # afterwards every residual is ~0 and ties are arbitrary
            assert b == max(scores, key=scores.get)
        brute = _projection_residual(A, basis)
        assert float(sel.residuals[t]) == pytest.approx(brute, rel=1e-8, abs=1e-7 * res0)
        chosen.append(b)
    assert float(sel.residuals[3]) <= 1e-7 * float(sel.residuals[0])
    assert float(sel.residuals[2]) > 0.1 * float(sel.residuals[0])
    # and the least-squares fold from G is exact in this rank-|K| case
    W = torch.randn(5, 24, generator=g, dtype=F64)
    Wk = least_squares_fold(A.T @ A, W, sel.cols, damping=0.0)
    torch.testing.assert_close(A[:, sel.cols] @ Wk.T, A @ W.T, rtol=1e-9, atol=1e-9)


# -- least-squares folding ---------------------------------------------------------------
def test_folds_exact_when_A_has_rank_K() -> None:
    g = _gen(10)
    AK = torch.randn(60, 5, generator=g, dtype=F64)
    A = torch.cat([AK, AK @ torch.randn(5, 7, generator=g, dtype=F64)], 1)  # (60, 12), rank 5
    W = torch.randn(3, 12, generator=g, dtype=F64)
    G, K, Y = A.T @ A, list(range(5)), A @ W.T
    scale = float(torch.linalg.matrix_norm(Y))
    for damping, tol in ((0.0, 1e-10), (1e-6, 1e-4)):
        Wk = least_squares_fold(G, W, K, damping=damping)
        assert Wk.shape == (3, 5)
        assert float(torch.linalg.matrix_norm(A[:, K] @ Wk.T - Y)) <= tol * scale
    d = interpolative_decomposition(A, 5)
    Wd = fold_interpolation(W, d.cols, d.T)
    assert float(torch.linalg.matrix_norm(A[:, d.cols] @ Wd.T - Y)) <= 1e-9 * scale
    # float32 weight in, float32 out
    assert least_squares_fold(G, W.float(), K).dtype == torch.float32


def test_least_squares_fold_rank_deficient_kept_block_is_finite() -> None:
    g = _gen(11)
    AK = torch.randn(40, 3, generator=g, dtype=F64)
    dup, dead = AK[:, :1], torch.zeros(40, 1, dtype=F64)
    A = torch.cat([AK, dup, dead, AK @ torch.randn(3, 2, generator=g, dtype=F64)], 1)  # (40, 7), rank 3
    W = torch.randn(4, 7, generator=g, dtype=F64)
    for damping in (1e-6, 0.0):  # damping 0 must fall back to a tiny ridge, not NaN
        Wk = least_squares_fold(A.T @ A, W, [0, 1, 2, 3, 4], damping=damping)
        assert torch.isfinite(Wk).all()
        Y = A @ W.T
        assert float(torch.linalg.matrix_norm(A[:, :5] @ Wk.T - Y)) <= 1e-4 * float(torch.linalg.matrix_norm(Y))


# -- input validation -------------------------------------------------------------------
def test_nan_and_inf_raise() -> None:
    A = torch.randn(6, 4, dtype=F64)
    A[2, 1] = float("nan")
    B = torch.eye(4, dtype=F64)
    B[0, 0] = float("inf")
    W = torch.randn(2, 4, dtype=F64)
    calls = [
        lambda: interpolative_decomposition(A, 2),
        lambda: id_from_gram(B, 2),
        lambda: GramAccumulator(4).update(A),
        lambda: select_blocks(B, 2, 1),
        lambda: least_squares_fold(B, W, [0]),
        lambda: GaussianSketch(4).update(A),
        lambda: CountSketch(4).update(A),
        lambda: fold_interpolation(W, [0], torch.full((1, 4), float("nan"))),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="contains NaN or inf"):
            call()


def test_bad_arguments_raise_clear_errors() -> None:
    A = torch.randn(6, 4, dtype=F64)
    G = A.T @ A
    with pytest.raises(ValueError, match="exactly one of k"):
        interpolative_decomposition(A)
    with pytest.raises(ValueError, match="exactly one of k"):
        id_from_gram(G, 2, rtol=0.1)
    with pytest.raises(ValueError, match=r"k must be an integer rank in \[0, 4\], got 5"):
        interpolative_decomposition(A, 5)
    with pytest.raises(ValueError, match="rtol must be"):
        interpolative_decomposition(A, rtol=-1.0)
    with pytest.raises(ValueError, match="square Gram"):
        id_from_gram(A, 2)
    with pytest.raises(ValueError, match="block_size must be a positive divisor of n=4, got 3"):
        select_blocks(G, 3, 1)
    with pytest.raises(ValueError, match=r"k_blocks must be an integer in \[0, 2\], got 3"):
        select_blocks(G, 2, 3)
    with pytest.raises(ValueError, match="must not repeat"):
        least_squares_fold(G, torch.randn(2, 4), [1, 1])
    with pytest.raises(ValueError, match=r"columns in \[0, 4\)"):
        least_squares_fold(G, torch.randn(2, 4), [4])
    with pytest.raises(ValueError, match=r"W must be \(out, 4\)"):
        least_squares_fold(G, torch.randn(2, 5), [0])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        GramAccumulator(4).update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="kind must be one of"):
        default_sketch_size(4, "srht")
    with pytest.raises(ValueError, match="before any update"):
        CountSketch(4).result()
    assert np.isfinite(interpolative_decomposition(A, 0).residuals.numpy()).all()


# -- sketch sizing and the on-device partial pivoted QR --------------------------------------
def test_partial_pivoted_qr_matches_scipy_and_keeps_the_gram() -> None:
    from tshrink_plugins.stat.idecomp import partial_pivoted_qr, weighted_residuals

    Y = low_rank_plus_noise(40, 64, r=10, noise=1e-2, seed=3)  # a short sketch: 40 rows, 64 columns
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    k = 12
    pivots, factor = partial_pivoted_qr(Y, k)
    ref = interpolative_decomposition(Y, k)
    assert pivots[:k].tolist() == ref.pivots[:k].tolist()
    assert sorted(pivots.tolist()) == list(range(64))
    torch.testing.assert_close(factor @ factor.T, Y.T @ Y, rtol=1e-10, atol=1e-10)
    got = weighted_residuals(factor, W)[: k + 1]
    want = weighted_residuals(ref.factor, W)[: k + 1]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_sketches_are_never_above_the_exact_cost() -> None:
    from tshrink_plugins.stat.collect import ColumnStats

    n = 50
    score = ColumnStats(n, sketch="gaussian")  # no target rank: every width is needed
    assert score.route == "gram" and "no target rank" in score.note
    wide = ColumnStats(n, sketch="gaussian", target_rank=30)  # 2*31+10 = 72 rows >= 50 columns
    assert wide.route == "gram" and "exact Gram (cheaper)" in wide.note
    short = ColumnStats(n, sketch="countsketch", target_rank=5)  # 4*6+10 = 34 rows
    assert short.route == "countsketch(34 rows)"
    thin = ColumnStats(n, sketch="gaussian", size=8, target_rank=10)  # fewer rows than kept columns
    assert thin.route == "gram"


@pytest.mark.parametrize("sketch", ["none", "gaussian"])
def test_gram_rows_are_the_rows_of_the_gram(sketch: str) -> None:
    from tshrink_plugins.stat.collect import ColumnStats

    A = low_rank_plus_noise(300, 40, r=8, noise=1e-2, seed=5).float() + 0.3
    st = ColumnStats(40, sketch=sketch, target_rank=6)
    st.update(A[None], torch.ones(1, 300, dtype=torch.bool))
    K = torch.tensor([3, 17, 5])
    for center in (False, True):
        G = st.gram(center)
        rows, trace = st.gram_rows(center, K)
        torch.testing.assert_close(rows, G[K], rtol=1e-9, atol=1e-9)
        assert math.isclose(trace, float(G.diagonal().sum()), rel_tol=1e-9)


def test_allocation_floors_are_kept_and_paid_first() -> None:
    from tshrink_plugins.stat.allocate import allocate_global

    steep = torch.tensor([10.0, 1.0, 0.5, 0.2, 0.1, 0.0], dtype=F64)  # 5 units, most gain in the first
    flat = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=F64)
    free = allocate_global([steep, flat], [1, 1], 3)
    assert free == [3, 0]  # without a floor the flat curve loses every unit
    floored = allocate_global([steep, flat], [1, 1], 3, floors=[1, 2])
    assert floored[1] >= 2 and floored[0] >= 1 and sum(floored) <= 3
    with pytest.raises(ValueError, match="minimum widths cost"):
        allocate_global([steep, flat], [1, 1], 3, floors=[2, 2])
