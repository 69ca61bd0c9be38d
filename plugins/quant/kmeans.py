"""k-means weight sharing (Deep Compression style scalar quantization).

Every weight of a group is replaced by the nearest of ``2**bits`` shared values (the
codebook); only the small integer index of that value is stored per weight.

Groups are contiguous runs of weights in row-major order, so a grouping is fully described
by the number of groups ``G``: the weight reshaped to ``(G, numel // G)``.

* ``"layer"``: one codebook for the whole tensor, ``G = 1``;
* ``"row"``:   one codebook per output row (first dim), ``G = W.shape[0]``;
* ``"group"``: one codebook per ``group_size`` consecutive weights of a row,
  ``G = W.numel() // group_size`` (``group_size`` must divide ``W.shape[-1]``).

Initialisation is deterministic: ``"linear"`` (default) spaces the centroids evenly over
``[min, max]`` of each group, which Han et al. (2016) found best because it keeps the
rare large weights representable; ``"quantile"`` puts them at the ``(j + 0.5) / K``
quantiles (density-based). ``"random"`` draws them uniformly in ``[min, max]`` from a
generator seeded with ``seed`` (the only use of ``seed``).

Lloyd iterations are vectorised over all groups: assignment is a batched
``searchsorted`` against the midpoints of the sorted centroids (1-D nearest neighbour),
the update a ``scatter_add``. A cluster that becomes empty is re-seeded at the point
with the largest squared error of its group (k-th empty cluster -> k-th worst point), so
codes are not wasted; each re-seed can only lower the error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GRANULARITIES = ("layer", "row", "group")
INITS = ("linear", "quantile", "random")
MAX_BITS = 8  # indices are stored as uint8


@dataclass
class KMeansResult:
    """Codebook quantization of one weight tensor.

    ``codebook`` is ``(G, 2**bits)`` in the dtype of the original weight; ``indices`` has
    the shape of the weight, dtype uint8; weight ``i`` of group ``g`` is
    ``codebook[g, indices.reshape(G, -1)[g, i]]``. ``iterations`` / ``converged`` report
    the Lloyd run (``converged``: the assignment stopped changing, so every non-empty
    centroid is the mean of its cluster).
    """

    codebook: Tensor  # (G, K)
    indices: Tensor  # shape of W, uint8
    iterations: int = 0
    converged: bool = False

    def __post_init__(self) -> None:
        if self.codebook.ndim != 2:
            raise ValueError(f"codebook must be 2-D (groups, 2**bits), got shape {tuple(self.codebook.shape)}")
        k = self.codebook.shape[1]
        if k < 2 or k > 2**MAX_BITS or k & (k - 1):
            raise ValueError(f"codebook width must be a power of two in 2..{2**MAX_BITS}, got {k}")
        if self.indices.dtype != torch.uint8:
            raise ValueError(f"indices must be uint8, got {self.indices.dtype}")
        if self.indices.numel() % self.codebook.shape[0]:
            raise ValueError(
                f"{self.indices.numel()} indices cannot be split into {self.codebook.shape[0]} equal groups"
            )

    @property
    def bits(self) -> int:
        """Index width: log2 of the codebook size."""
        return self.codebook.shape[1].bit_length() - 1

    @property
    def shape(self) -> torch.Size:
        """Shape of the quantized weight."""
        return self.indices.shape

    def dequantize(self) -> Tensor:
        """The quantized weight, shape of the original, dtype of the codebook."""
        g = self.codebook.shape[0]
        idx = self.indices.reshape(g, -1).long()  # (G, N)
        return torch.gather(self.codebook, 1, idx).reshape(self.indices.shape)


def group_view(W: Tensor, granularity: str = "layer", group_size: int | None = None) -> Tensor:
    """Reshape ``W`` to ``(G, N)``, one row per codebook group (see module docstring)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if W.ndim == 0 or W.numel() == 0:
        raise ValueError(f"cannot quantize a tensor of shape {tuple(W.shape)}; need at least one element and dim")
    if granularity != "group" and group_size is not None:
        raise ValueError(f"group_size={group_size} is only used with granularity='group', got {granularity!r}")
    if granularity == "layer":
        return W.reshape(1, -1)
    if W.ndim < 2:
        raise ValueError(f"granularity {granularity!r} needs a tensor with >= 2 dims, got shape {tuple(W.shape)}")
    if granularity == "row":
        return W.reshape(W.shape[0], -1)
    if not isinstance(group_size, int) or group_size < 1 or W.shape[-1] % group_size:
        raise ValueError(
            f"group_size must be a positive integer dividing the last dim {W.shape[-1]}, got {group_size!r}"
        )
    return W.reshape(-1, group_size)


def assign(X: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid for every entry of ``X``.

    ``X``: ``(G, N)``; ``centroids``: ``(G, K)`` sorted ascending along dim 1.
    Returns ``(G, N)`` int64. A point exactly on a midpoint goes to the lower centroid.
    """
    bounds = (centroids[:, :-1] + centroids[:, 1:]) / 2  # (G, K-1)
    return torch.searchsorted(bounds.contiguous(), X.contiguous())


def update(X: Tensor, idx: Tensor, k: int) -> Tensor:
    """Cluster means of ``X`` under assignment ``idx``, empty clusters re-seeded; sorted.

    ``X``: ``(G, N)``; ``idx``: ``(G, N)`` int64 in ``[0, k)``. Returns ``(G, k)``.
    """
    # accumulate in float64 / int64 so large layers do not lose precision in the sums
    sums = torch.zeros(X.shape[0], k, dtype=torch.float64, device=X.device)
    sums.scatter_add_(1, idx, X.double())  # (G, K)
    counts = torch.zeros(X.shape[0], k, dtype=torch.int64, device=X.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx))  # (G, K)
    means = (sums / counts.clamp(min=1)).to(X.dtype)
    empty = counts == 0  # (G, K)
    if empty.any():
        err = (X - torch.gather(means, 1, idx)) ** 2  # (G, N), distance to own (non-empty) centroid
        m = min(k, X.shape[1])
        worst = err.topk(m, dim=1).indices  # (G, m), worst-fitting points first
        rank = (empty.long().cumsum(1) - 1).clamp(0, m - 1)  # (G, K): j-th empty cluster -> j-th worst
        seeds = torch.gather(X, 1, torch.gather(worst, 1, rank))  # (G, K)
        means = torch.where(empty, seeds, means)
    return means.sort(dim=1).values


def init_centroids(X: Tensor, k: int, init: str = "linear", seed: int = 0) -> Tensor:
    """Initial sorted centroids ``(G, k)`` for the groups ``X`` of shape ``(G, N)``."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    lo = X.min(dim=1, keepdim=True).values  # (G, 1)
    hi = X.max(dim=1, keepdim=True).values
    if init == "linear":
        steps = torch.arange(k, dtype=X.dtype, device=X.device) / (k - 1)  # (K,)
        return lo + (hi - lo) * steps
    if init == "quantile":
        n = X.shape[1]
        pos = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1).to(X.device)  # (K,)
        return X.sort(dim=1).values[:, pos]
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(X.shape[0], k, generator=gen, dtype=X.dtype).to(X.device)  # (G, K)
    return (lo + (hi - lo) * u).sort(dim=1).values


def lloyd(X: Tensor, centroids: Tensor, iters: int) -> tuple[Tensor, Tensor, int, bool]:
    """Run at most ``iters`` Lloyd iterations on ``X`` ``(G, N)`` from sorted ``centroids`` ``(G, K)``.

    Returns ``(centroids, idx, iterations, converged)``; ``idx`` is always the nearest
    assignment to the returned centroids, and on convergence the centroids are the means
    of their (non-empty) clusters.
    """
    k = centroids.shape[1]
    idx = assign(X, centroids)
    for it in range(1, iters + 1):
        centroids = update(X, idx, k)
        new_idx = assign(X, centroids)
        if torch.equal(new_idx, idx):
            return centroids, idx, it, True
        idx = new_idx
    return centroids, idx, iters, False


def kmeans_quantize(
    W: Tensor,
    bits: int,
    *,
    granularity: str = "layer",
    group_size: int | None = None,
    init: str = "linear",
    iters: int = 100,
    seed: int = 0,
) -> KMeansResult:
    """Quantize ``W`` to ``2**bits`` shared values per group with 1-D k-means.

    ``bits`` in 1..8; ``granularity`` "layer" | "row" | "group" (with ``group_size``);
    ``init`` "linear" | "quantile" | "random" (``seed`` only matters for "random");
    ``iters`` caps the Lloyd iterations (0 = keep the initial centroids). Computes in
    float32 (float64 for float64 input); the codebook gets the dtype of ``W``.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {W.dtype}")
    compute = torch.float64 if W.dtype == torch.float64 else torch.float32
    X = group_view(W.detach(), granularity, group_size).to(compute)  # (G, N)
    if not torch.isfinite(X).all():
        raise ValueError("W contains NaN or inf; k-means needs finite weights")
    c0 = init_centroids(X, 2**bits, init, seed)
    centroids, idx, it, converged = lloyd(X, c0, iters)
    return KMeansResult(
        codebook=centroids.to(W.dtype),
        indices=idx.to(torch.uint8).reshape(W.shape),
        iterations=it,
        converged=converged,
    )


def codebook_gradient(codebook: Tensor, indices: Tensor, grad_W: Tensor) -> Tensor:
    """Gradient of the loss w.r.t. the codebook for fixed assignments.

    Each centroid receives the sum of the weight gradients of its cluster:
    ``grad[g, j] = sum_{i: indices[g, i] == j} grad_W[g, i]``. Returns ``(G, K)``.
    """
    if indices.shape != grad_W.shape:
        raise ValueError(f"grad_W shape {tuple(grad_W.shape)} must equal indices shape {tuple(indices.shape)}")
    g, k = codebook.shape
    if indices.numel() % g:
        raise ValueError(f"{indices.numel()} indices cannot be split into {g} codebook groups")
    idx = indices.reshape(g, -1).long()  # (G, N)
    grad = grad_W.reshape(g, -1).to(codebook.dtype)
    return torch.zeros(g, k, dtype=codebook.dtype, device=codebook.device).scatter_add_(1, idx, grad)


def centroid_gradient_step(codebook: Tensor, indices: Tensor, grad_W: Tensor, lr: float) -> Tensor:
    """One SGD step on the codebook with assignments held fixed (recovery training).

    ``grad_W`` is dL/dW of the dequantized weight (shape of ``indices``). Returns a new
    ``(G, K)`` codebook ``codebook - lr * codebook_gradient(...)``; inputs are not modified.
    """
    return codebook - lr * codebook_gradient(codebook, indices, grad_W)
