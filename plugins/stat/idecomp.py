"""Interpolative decompositions and least-squares folding: the numerical core of STAT.

STAT (Flynn et al., arXiv 2406.00061) prunes the neurons of an MLP, or the heads of an
attention block, by a column interpolative decomposition (ID) of the activation matrix
``A`` (tokens x units): ``A ~ A[:, cols] @ T`` with ``T[:, cols] = I``. Keeping the units
``cols`` and replacing the next layer's weight ``W`` (torch convention ``y = x W^T``) by
``W T^T`` reproduces ``A W^T`` up to the ID error. Everything here is pure math on tensors.

Two routes to the same ID:

* ``interpolative_decomposition(A)`` -- column-pivoted QR ``A P = Q R`` (Businger-Golub).
  torch has no pivoted QR, so ``A`` is copied to float64 on the CPU and handed to
  ``scipy.linalg.qr(..., pivoting=True)`` in ``mode='raw'``: that is the economic
  factorisation without forming ``Q`` (which the ID never needs), saving an ``m x n``
  matrix and half the time. Cost ``O(m n^2)``; feed a sketch (see ``sketch.py``) when ``m``
  is large.
* ``id_from_gram(G)`` with ``G = A^T A`` (streamed by ``GramAccumulator``) -- pivoted
  Cholesky where ``G`` lives: LAPACK's blocked ``dpstrf`` on the CPU, a blocked torch
  loop elsewhere (GPU included; ``_pivoted_cholesky``). Its ``L^T`` is the ``R``
  of the pivoted QR and, in exact arithmetic, its pivots are the same. Squaring ``A``
  squares the condition number: singular values below about ``sqrt(n * eps) ~ 1e-7``
  times the largest are numerical noise here, so the Gram route resolves less of the tail
  than the QR route does.

Residuals. For rank ``r`` with ``R = [[R11, R12], [0, R22]]`` (``R11`` is ``r x r``),
``A - A[:, I_r] T_r = -Q2 R22`` after undoing the pivoting, so ``||R22||_F`` is the exact
Frobenius error of the rank-``r`` ID. ``ID.residuals[r]`` stores it (from the trailing
row norms of ``R``, or the trace of the Schur complement of ``G``); it is an upper bound on
the spectral error and at most ``sqrt(min(m, n) - r)`` times it.

Rank deficiency is handled by truncation: the numerical rank ``r_num`` is the number of
leading pivots above ``max(m, n) * eps * |R[0, 0]|`` (QR) or ``n * eps * max(diag G)`` on
the squared scale (Gram). When ``k > r_num`` the ``k`` requested columns are all kept (the
caller's width is respected) but the other columns are interpolated from the first
``r_num`` kept ones only; the extra kept columns get identity rows. No inverse of a
singular block is ever formed, so no inf/NaN; the error is that of the rank-``r_num`` ID,
i.e. at noise level.

Block selection (heads) and the least-squares fold work from ``G`` alone; see
``select_blocks`` and ``least_squares_fold``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

_EPS64 = float(np.finfo(np.float64).eps)
_PANEL = 64  # pivots per panel of the torch pivoted Cholesky


# -- validation -------------------------------------------------------------------------
def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError if ``t`` holds a NaN or an infinity."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; pass finite values only")


def _check_matrix(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} must be real, got dtype {t.dtype}")
    check_finite(name, t)


def _check_gram(G: torch.Tensor) -> None:
    _check_matrix("G", G)
    if G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square Gram matrix A^T A, got shape {tuple(G.shape)}")


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _check_k(k: int | None, rtol: float | None, n: int) -> None:
    if (k is None) == (rtol is None):
        raise ValueError(f"give exactly one of k (a rank) or rtol (a tolerance); got k={k}, rtol={rtol}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n):
        raise ValueError(f"k must be an integer rank in [0, {n}], got {k!r}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}")


def _as_index(name: str, idx: torch.Tensor | Sequence[int], n: int, device: torch.device) -> torch.Tensor:
    """Validate a list of distinct column indices in ``[0, n)``; return a LongTensor."""
    t = torch.as_tensor(idx, device=device)
    if t.ndim != 1 or (t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)):
        raise ValueError(f"{name} must be a 1-D sequence of integer column indices, got {idx!r}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"{name} must index columns in [0, {n}), got min {int(t.min())} max {int(t.max())}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"{name} must not repeat a column, got {t.tolist()}")
    return t


# -- the decomposition ------------------------------------------------------------------
@dataclass(frozen=True)
class ID:
    """Column interpolative decomposition ``A ~ A[:, cols] @ T``.

    ``cols`` (k,) kept columns in pivot order; ``T`` (k, n) with ``T[:, cols] = I``;
    ``pivots`` (n,) full pivot order (``cols = pivots[:k]``); ``residuals`` (n+1,) the
    Frobenius error of the rank-r ID for r = 0..n (nonincreasing, ``residuals[n] = 0``);
    ``numerical_rank`` the number of pivots above the rank tolerance (module docstring).
    ``factor`` (n, r): column ``i`` is the ``i``-th eliminated direction, rows in the original
    column order, so the Schur complement of ``G = A^T A`` after the first ``j`` pivots is
    ``G - factor[:, :j] factor[:, :j]^T`` (``factor = R^T`` un-pivoted; see
    ``weighted_residuals``).
    """

    cols: torch.Tensor
    T: torch.Tensor
    pivots: torch.Tensor
    residuals: torch.Tensor
    numerical_rank: int
    factor: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.cols.numel())


def _rank_for(residuals: torch.Tensor, norm2: float, rtol: float) -> int:
    """Smallest r with residuals[r] <= rtol * norm2 (residuals nonincreasing, last is 0)."""
    ok = (residuals <= rtol * norm2).nonzero()
    return int(ok[0]) if ok.numel() else residuals.numel() - 1


def _assemble_T(R: torch.Tensor, pivots: torch.Tensor, k: int, r_num: int) -> torch.Tensor:
    """T (k, n) in column order from the pivot-ordered upper-trapezoidal ``R`` (>= r_num rows)."""
    n = pivots.numel()
    Tp = torch.zeros(k, n, dtype=R.dtype, device=R.device)  # (k, n), pivot order
    Tp[:, :k] = torch.eye(k, dtype=R.dtype, device=R.device)
    r = min(k, r_num)
    if r > 0 and k < n:
        Tp[:r, k:] = torch.linalg.solve_triangular(R[:r, :r], R[:r, k:], upper=True)
    T = torch.empty_like(Tp)
    T[:, pivots] = Tp
    return T


def interpolative_decomposition(A: torch.Tensor, k: int | None = None, *, rtol: float | None = None) -> ID:
    """Column ID of ``A`` (m, n) by column-pivoted QR (scipy, float64, CPU).

    Give the rank ``k`` or ``rtol``: the smallest rank whose Frobenius residual (an upper
    bound on the spectral error) is ``<= rtol * ||A||_2``. Results come back on ``A``'s
    device, ``T``/``residuals`` in ``A``'s floating dtype.
    """
    _check_matrix("A", A)
    m, n = A.shape
    _check_k(k, rtol, n)
    k = None if k is None else int(k)
    a = np.array(A.detach().to("cpu", torch.float64).numpy(), dtype=np.float64, order="F", copy=True)
    (_, _), R_np, piv_np = scipy.linalg.qr(a, mode="raw", pivoting=True, overwrite_a=True, check_finite=False)
    R = torch.from_numpy(np.ascontiguousarray(R_np))  # (min(m, n), n), pivot order
    pivots = torch.from_numpy(piv_np.astype(np.int64))

    diag = R.diagonal().abs()
    r_num = int((diag > max(m, n) * _EPS64 * diag[0]).long().cumprod(0).sum()) if float(diag[0]) > 0 else 0
    row_energy = (R * R).sum(1)  # (min(m, n),), ||R[i, i:]||^2
    tail = row_energy.flip(0).cumsum(0).flip(0).sqrt()
    residuals = torch.zeros(n + 1, dtype=torch.float64)
    residuals[: tail.numel()] = tail
    residuals = torch.cummin(residuals, 0).values  # guard against rounding upticks

    if k is None:
        norm2 = float(torch.linalg.matrix_norm(R, 2)) if r_num else 0.0
        k = _rank_for(residuals, norm2, float(rtol))
    T = _assemble_T(R, pivots, k, r_num)
    factor = torch.zeros(n, R.shape[0], dtype=R.dtype)  # (n, min(m, n))
    factor[pivots] = R.T
    dev, dt = A.device, _out_dtype(A)
    return ID(
        cols=pivots[:k].to(dev),
        T=T.to(dev, dt),
        pivots=pivots.to(dev),
        residuals=residuals.to(dev, dt),
        numerical_rank=r_num,
        factor=factor.to(dev, dt),
    )


# -- Gram route -------------------------------------------------------------------------
class GramAccumulator:
    """Streams ``G = A^T A`` in float64 over batches of rows of ``A``.

    ``update`` takes (..., n) activations (leading dims are flattened into rows) on any
    device; ``G`` lives on the device of the first batch unless ``device`` is given.
    """

    def __init__(self, n: int, *, device: torch.device | str | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive number of columns, got {n!r}")
        self.n = n
        self.rows = 0
        self._device = None if device is None else torch.device(device)
        self._G: torch.Tensor | None = None

    def update(self, A_batch: torch.Tensor) -> None:
        """Add ``A_batch^T A_batch`` for a batch of rows (..., n)."""
        if not isinstance(A_batch, torch.Tensor) or A_batch.ndim < 1 or A_batch.shape[-1] != self.n:
            shape = tuple(A_batch.shape) if isinstance(A_batch, torch.Tensor) else type(A_batch).__name__
            raise ValueError(f"A_batch must be a tensor of shape (..., {self.n}), got {shape}")
        check_finite("A_batch", A_batch)
        if self._G is None:
            dev = self._device or A_batch.device
            self._G = torch.zeros(self.n, self.n, dtype=torch.float64, device=dev)
        a = A_batch.detach().reshape(-1, self.n).to(self._G.device, torch.float64)  # (rows, n)
        self._G.addmm_(a.T, a)
        self.rows += a.shape[0]

    def result(self) -> torch.Tensor:
        """The accumulated Gram matrix (n, n), float64 (the live buffer, not a copy)."""
        if self._G is None:
            raise ValueError("GramAccumulator.result() called before any update()")
        return self._G


def _pivoted_cholesky(G: torch.Tensor, tol: float | None = None, *,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (largest Schur diagonal first) pivoted Cholesky of a symmetric PSD float64 ``G``
    (n, n), stopped once the largest remaining pivot is ``<= tol`` (default
    ``n * eps * max(diag G)``). Returns ``order`` (r,) the eliminated columns and ``L`` (n, r)
    with rows in the original order, ``G ~ L L^T`` (the Schur complement after ``j`` steps is
    ``G - L[:, :j] L[:, :j]^T``).

    ``backend``: ``"lapack"`` (default on the CPU) is LAPACK's blocked ``dpstrf`` through
    scipy; ``"torch"`` (default elsewhere, so a GPU Gram stays on the GPU) is the same
    right-looking blocked algorithm in torch: inside a panel of ``_PANEL`` pivots each new
    column is one GEMV against the panel only, and the trailing Schur complement is updated
    once per panel (one GEMM). Both take the same pivots in exact arithmetic and use the
    same stopping rule.
    """
    n = G.shape[0]
    if tol is None:
        tol = n * _EPS64 * float(G.diagonal().clamp(min=0).max())
    backend = backend or ("lapack" if G.device.type == "cpu" else "torch")
    if backend not in ("lapack", "torch"):
        raise ValueError(f"backend must be 'lapack' or 'torch', got {backend!r}")
    if backend == "lapack":
        c, piv, rank, info = scipy.linalg.lapack.dpstrf(G.numpy(), tol=tol, lower=0)
        if info < 0:  # pragma: no cover - argument error, cannot happen with a square float64 array
            raise ValueError(f"LAPACK dpstrf rejected argument {-info}")
        piv = torch.from_numpy(piv.astype(np.int64) - 1)
        U = torch.from_numpy(np.triu(c[:rank]))  # (rank, n), pivot order
        L = torch.zeros(n, rank, dtype=torch.float64)
        L[piv] = U.T
        return piv[:rank], L
    S = G.clone()  # (n, n) Schur complement, refreshed after every panel
    d = S.diagonal().clone().clamp_(min=0)  # (n,) its current diagonal
    L = torch.zeros(n, n, dtype=G.dtype, device=G.device)
    done = torch.zeros(n, dtype=torch.bool, device=G.device)
    order: list[int] = []
    r, stop = 0, False
    while not stop and r < n:
        r0 = r
        for _ in range(min(_PANEL, n - r0)):
            p = int(torch.argmax(d.masked_fill(done, -1.0)))
            dp = float(d[p])
            if dp <= tol:
                stop = True
                break
            col = S[:, p] - L[:, r0:r] @ L[p, r0:r]  # (n,)
            col /= math.sqrt(dp)
            col[done] = 0.0
            L[:, r] = col
            d.sub_(col * col).clamp_(min=0)
            d[p] = 0.0
            done[p] = True
            order.append(p)
            r += 1
        if r > r0:
            S.addmm_(L[:, r0:r], L[:, r0:r].T, alpha=-1.0)
    return torch.tensor(order, dtype=torch.long, device=G.device), L[:, :r]


def id_from_gram(G: torch.Tensor, k: int | None = None, *, rtol: float | None = None) -> ID:
    """Column ID of ``A`` from ``G = A^T A`` (n, n) by pivoted Cholesky (``_pivoted_cholesky``:
    LAPACK on the CPU, torch elsewhere).

    Same contract as ``interpolative_decomposition`` (``rtol`` is relative to
    ``||A||_2 = sqrt(lambda_max(G))``); results on ``G``'s device and dtype. The full pivot
    order is computed (``O(n^2 r)`` for numerical rank ``r``) so that ``residuals`` covers
    every rank.
    """
    _check_gram(G)
    n = G.shape[0]
    _check_k(k, rtol, n)
    k = None if k is None else int(k)
    G64 = G.detach().to(torch.float64)
    G64 = 0.5 * (G64 + G64.T)
    order, L = _pivoted_cholesky(G64)
    r_num = order.numel()
    done = torch.zeros(n, dtype=torch.bool, device=G.device)
    done[order] = True
    d = (G64.diagonal() - L.pow(2).sum(1)).clamp(min=0).masked_fill(done, 0.0)  # final Schur diagonal
    # below the numerical rank: order the rest by their (noise-level) Schur diagonal
    rest = (~done).nonzero().flatten()
    rest_d, rank_in_rest = torch.sort(d[rest], descending=True, stable=True)
    pivots = torch.cat([order, rest[rank_in_rest]])
    tail = torch.cat([rest_d.flip(0).cumsum(0).flip(0), rest_d.new_zeros(1)])  # after r_num + i pivots
    col_energy = L.pow(2).sum(0)  # (r_num,)
    head = col_energy.flip(0).cumsum(0).flip(0) + tail[0]  # energy left after j < r_num pivots
    residuals = torch.cummin(torch.cat([head, tail]).clamp(min=0).sqrt(), 0).values  # (n+1,)

    R = L[pivots].T  # (r_num, n), upper trapezoidal in pivot order
    if k is None:
        norm2 = float(torch.linalg.eigvalsh(G64)[-1].clamp(min=0).sqrt()) if r_num else 0.0
        k = _rank_for(residuals, norm2, float(rtol))
    T = _assemble_T(R, pivots, k, r_num)
    dt = _out_dtype(G)
    return ID(cols=pivots[:k], T=T.to(dt), pivots=pivots, residuals=residuals.to(dt), numerical_rank=r_num,
              factor=L.to(dt))


# -- head granularity -------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSelection:
    """Greedy block-pivoted selection of column blocks (heads).

    ``blocks`` (k_blocks,) chosen block indices in selection order; ``cols`` their columns,
    block by block; ``order`` (nblocks,) the full greedy order; ``residuals`` (nblocks+1,)
    the Frobenius norm of A left after least-squares projection onto the first t blocks of
    ``order`` (squares are residual energies; ``residuals[0] = ||A||_F``). ``factor`` (n, r)
    the eliminated directions as in :class:`ID`; ``ends`` (nblocks,) how many of them the
    first t+1 blocks of ``order`` account for (rank-deficient blocks contribute fewer).
    """

    blocks: torch.Tensor
    cols: torch.Tensor
    order: torch.Tensor
    residuals: torch.Tensor
    factor: torch.Tensor | None = None
    ends: torch.Tensor | None = None


def block_columns(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Column indices (len(blocks)*block_size,) of ``blocks``, block by block."""
    ar = torch.arange(block_size, device=blocks.device)
    return (blocks.long()[:, None] * block_size + ar).reshape(-1)


def select_blocks(G: torch.Tensor, block_size: int, k_blocks: int,
                  order: torch.Tensor | Sequence[int] | None = None) -> BlockSelection:
    """Choose ``k_blocks`` of the ``n / block_size`` contiguous column blocks from ``G = A^T A``.

    Each step takes the block with the largest residual Frobenius norm (sum of its Schur
    diagonal) after projecting out every column already chosen -- or, given ``order`` (a
    permutation of the blocks), the next block of that order -- then eliminates that
    block's columns by pivoted Cholesky inside the block (columns already in the span are
    skipped, so rank-deficient blocks are fine); the block's new factor columns for all rows
    come from one triangular solve (BLAS-3). Runs through all blocks so ``residuals``
    covers 0..nblocks; on ``G``'s device.
    """
    _check_gram(G)
    n = G.shape[0]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or n % block_size:
        raise ValueError(f"block_size must be a positive divisor of n={n}, got {block_size!r}")
    nb = n // block_size
    if isinstance(k_blocks, bool) or not isinstance(k_blocks, int) or not 0 <= k_blocks <= nb:
        raise ValueError(f"k_blocks must be an integer in [0, {nb}], got {k_blocks!r}")
    if order is not None:
        forced = _as_index("order", order, nb, G.device)
        if forced.numel() != nb:
            raise ValueError(f"order must be a permutation of the {nb} blocks, got {forced.numel()} entries")
    G64 = G.detach().to(torch.float64)
    G64 = 0.5 * (G64 + G64.T)
    d = G64.diagonal().clone().clamp_(min=0)  # (n,) Schur diagonal
    tol = n * _EPS64 * float(d.max())
    L = torch.zeros(n, n, dtype=torch.float64, device=G.device)  # (n, rank) used
    done = torch.zeros(n, dtype=torch.bool, device=G.device)
    r = 0
    chosen = torch.zeros(nb, dtype=torch.bool, device=G.device)
    taken: list[int] = []
    ends: list[int] = []
    energies = [d.sum()]
    for step in range(nb):
        b = (int(forced[step]) if order is not None
             else int(torch.argmax(d.view(nb, block_size).sum(1).masked_fill(chosen, -1.0))))
        lo = b * block_size
        S = G64[:, lo : lo + block_size] - L[:, :r] @ L[lo : lo + block_size, :r].T  # (n, bs) Schur columns
        # pivoted Cholesky inside the block (largest residual column first, columns already in
        # the span skipped), then all rows of the new factor columns at once (one GEMM):
        # X = S[:, piv] U^{-1} with S[piv, piv] = U^T U, so X X^T projects the block out.
        piv, Lb = _pivoted_cholesky(0.5 * (S[lo : lo + block_size] + S[lo : lo + block_size].T), tol)
        q = piv.numel()
        if q:
            U = Lb[piv.to(Lb.device)].T.to(G.device)  # (q, q) upper triangular
            # (n, q): X U = S[:, piv]
            X = torch.linalg.solve_triangular(U, S[:, piv.to(G.device)], upper=True, left=False)
            X[done] = 0.0
            L[:, r : r + q] = X
            r += q
            d.sub_(X.pow(2).sum(1)).clamp_(min=0)
            done[lo + piv.to(G.device)] = True
        d[lo : lo + block_size] = 0.0  # what is left there is below the rank tolerance
        chosen[b] = True
        taken.append(b)
        ends.append(r)
        energies.append(d.sum())
    order_t = torch.tensor(taken, dtype=torch.long, device=G.device)
    residuals = torch.cummin(torch.stack(energies).clamp(min=0).sqrt(), 0).values
    blocks = order_t[:k_blocks]
    return BlockSelection(blocks=blocks, cols=block_columns(blocks, block_size), order=order_t,
                          residuals=residuals.to(_out_dtype(G)), factor=L[:, :r].to(_out_dtype(G)),
                          ends=torch.tensor(ends, dtype=torch.long, device=G.device))


def weighted_residuals(factor: torch.Tensor, W: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
    """Output errors ``||A W^T - P_t A W^T||_F`` along an elimination order, ``P_t`` the
    projector onto the columns eliminated in the first ``t`` steps.

    ``factor`` (n, r) from :class:`ID` or :class:`BlockSelection` (``G ~ factor factor^T``
    up to the rank tolerance), ``W`` (out, n) the weight that reads ``A`` (``y = A W^T``).
    Since the Schur complement after ``j`` eliminations is ``sum_{i >= j} f_i f_i^T``, the
    squared error is ``sum_{i >= j} ||W f_i||^2`` -- the exact calibration error of the
    least-squares (equivalently ID) fold, for every step at the cost of one matmul.
    ``ends`` (steps,) cumulative eliminations after each step (default: one column per
    step, ``steps = n``). Returns (steps+1,) nonincreasing, float64, on ``factor``'s device.
    """
    _check_matrix("W", W)
    if not isinstance(factor, torch.Tensor) or factor.ndim != 2 or factor.shape[0] != W.shape[1]:
        shape = tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__
        raise ValueError(f"factor must be a ({W.shape[1]}, r) tensor to match W {tuple(W.shape)}, got {shape}")
    check_finite("factor", factor)
    n, r = factor.shape
    if ends is None:
        ends = torch.arange(1, n + 1, device=factor.device).clamp(max=r)
    ends = torch.as_tensor(ends, device=factor.device).long()
    if ends.ndim != 1 or (ends.numel() and (int(ends.min()) < 0 or int(ends.max()) > r)):
        raise ValueError(f"ends must be a 1-D tensor of counts in [0, {r}], got {ends.tolist()}")
    energy = (W.detach().to(factor.device, torch.float64) @ factor.to(torch.float64)).pow(2).sum(0)  # (r,)
    suffix = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # (r+1,)
    start = torch.cat([ends.new_zeros(1), ends])  # (steps+1,)
    return torch.cummin(suffix[start].clamp(min=0).sqrt(), 0).values


# -- folding into the next layer --------------------------------------------------------
def fold_interpolation(W: torch.Tensor, cols: torch.Tensor | Sequence[int], T: torch.Tensor) -> torch.Tensor:
    """Next-layer weight for the kept units: ``W' = W T^T`` (out, k).

    With ``A ~ A[:, cols] T``: ``A W^T ~ A[:, cols] T W^T = A[:, cols] W'^T``. Computed in
    float64, returned in ``W``'s dtype on ``W``'s device.
    """
    _check_matrix("W", W)
    out, n = W.shape
    if not isinstance(T, torch.Tensor) or T.ndim != 2 or T.shape[1] != n or T.is_complex():
        shape = tuple(T.shape) if isinstance(T, torch.Tensor) else type(T).__name__
        raise ValueError(f"T must be a real (k, {n}) tensor to match W {tuple(W.shape)}, got {shape}")
    check_finite("T", T)
    c = _as_index("cols", cols, n, W.device)
    if c.numel() != T.shape[0]:
        raise ValueError(f"cols has {c.numel()} entries but T has {T.shape[0]} rows; they must agree")
    Wp = W.detach().to(torch.float64) @ T.detach().to(W.device, torch.float64).T  # (out, k)
    return Wp.to(_out_dtype(W))


def least_squares_fold(G: torch.Tensor, W: torch.Tensor, keep: torch.Tensor | Sequence[int], *,
                       damping: float = 1e-6) -> torch.Tensor:
    """``W_K'`` (out, |K|) minimising ``||A W^T - A[:, K] W_K'^T||_F`` from ``G = A^T A`` only.

    Normal equations ``(G_KK + lam I) X = G_K: W^T``, ``W_K' = X^T``, with the ridge
    ``lam = damping * trace(G) / n`` (relative to the mean column energy) so that a
    rank-deficient ``G_KK`` still has a unique, bounded solution; ``damping=0`` gives the
    exact least-squares fit when ``G_KK`` is nonsingular. If the damped matrix is still not
    numerically positive definite, ``lam`` is raised tenfold (from ``n * eps`` relative)
    until the Cholesky factorisation succeeds. Computed in float64 on ``G``'s device;
    returned in ``W``'s dtype on ``W``'s device. Only the rows ``G[K]`` and the trace are
    read (:func:`least_squares_fold_rows` takes just those).
    """
    _check_gram(G)
    n = G.shape[0]
    K = _as_index("keep", keep, n, G.device)
    G64 = G.detach().to(torch.float64)
    return least_squares_fold_rows(G64[K], float(G64.diagonal().sum()), W, K, damping=damping)


def least_squares_fold_rows(GK: torch.Tensor, trace: float, W: torch.Tensor, keep: torch.Tensor | Sequence[int], *,
                            damping: float = 1e-6) -> torch.Tensor:
    """:func:`least_squares_fold` from the kept rows ``GK = G[K]`` (|K|, n) and ``trace(G)``:
    what a sketch gives without forming the n x n Gram (``GK = Y_K^T Y``)."""
    _check_matrix("W", W)
    n = GK.shape[1]
    if W.shape[1] != n:
        raise ValueError(f"W must be (out, {n}) to match G's {n} columns, got {tuple(W.shape)}")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    K = _as_index("keep", keep, n, GK.device)
    if GK.shape[0] != K.numel():
        raise ValueError(f"GK has {GK.shape[0]} rows for {K.numel()} kept columns")
    G64 = GK.detach().to(torch.float64)
    W64 = W.detach().to(GK.device, torch.float64)
    scale = trace / n
    if K.numel() == 0 or scale <= 0:  # nothing kept, or A = 0: the zero map is optimal
        return torch.zeros(W.shape[0], K.numel(), dtype=_out_dtype(W), device=W.device)
    GKK = G64[:, K]
    GKK = 0.5 * (GKK + GKK.T)  # (|K|, |K|)
    rhs = G64 @ W64.T  # (|K|, out)
    lam = damping * scale
    eye = torch.eye(K.numel(), dtype=torch.float64, device=GK.device)
    for _ in range(40):
        chol, info = torch.linalg.cholesky_ex(GKK + lam * eye)
        if int(info) == 0:
            break
        lam = max(10 * lam, n * _EPS64 * scale)
    else:  # pragma: no cover - lam >= scale makes G_KK + lam I diagonally dominant enough
        raise ValueError("least_squares_fold: could not factor G[K, K] + lam I; is G a Gram matrix?")
    X = torch.cholesky_solve(rhs, chol)  # (|K|, out)
    return X.T.to(W.device, _out_dtype(W))


def partial_pivoted_qr(Y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` steps of column-pivoted QR of a short sketch ``Y`` (s, n), in torch
    on ``Y``'s device (no host round trip): ``O(k s n)``.

    Returns ``(pivots, factor)``: ``pivots`` (n,) the k chosen columns then the others by
    their residual norm; ``factor`` (n, k + s) with ``Y^T Y = factor factor^T`` exactly --
    the k rows ``q_j^T Y`` of R, then the rows of the residual ``E = Y - Q_k Q_k^T Y`` -- so
    :func:`weighted_residuals` gives the exact sketched fold errors for widths ``t <= k``.
    Each step recomputes the residual column norms (no downdating, no cancellation).
    """
    _check_matrix("Y", Y)
    s, n = Y.shape
    k = max(0, min(int(k), n, s))
    E = Y.detach().to(torch.float64).clone()  # (s, n)
    rows = E.new_zeros(k, n)  # (k, n)
    chosen = torch.zeros(n, dtype=torch.bool, device=Y.device)
    order = []
    norms = E.pow(2).sum(0)  # (n,)
    tiny = float(norms.max()) * _EPS64 * max(s, n) if n else 0.0
    for j in range(k):
        p = int(torch.argmax(norms.masked_fill(chosen, -1.0)))
        if float(norms[p]) <= tiny:
            rows = rows[:j]
            break
        q = E[:, p] / norms[p].sqrt()  # (s,)
        r = q @ E  # (n,)
        E.sub_(torch.outer(q, r))
        rows[j] = r
        chosen[p] = True
        order.append(p)
        norms = E.pow(2).sum(0)
    rest = (~chosen).nonzero().flatten()
    rest = rest[torch.argsort(norms[rest], descending=True, stable=True)]
    pivots = torch.cat([torch.as_tensor(order, dtype=torch.long, device=Y.device), rest])
    factor = torch.cat([rows, E], 0).T  # (n, k' + s)
    return pivots, factor.to(_out_dtype(Y))
