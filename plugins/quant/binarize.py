"""Binarization: two values per row (or per group of ``group_size`` weights of a row).

Three schemes, all L2-optimal for what they fix:

* ``binarize_sign`` -- symmetric sign-with-scale ``w -> alpha * sign(w)`` (``sign(0) = +1``)
  with ``alpha = mean|w|``. For a fixed sign pattern ``b``, ``||w - alpha b||^2`` is
  minimised by ``alpha = <w, b> / <b, b> = sum|w| / n``. Stored as 1 sign bit per weight
  plus one scale per group.
* ``binarize_fixed`` -- 1-bit k-means: two free centroids per group. Solved EXACTLY
  (not by Lloyd): in 1-D the optimal 2-clustering splits the sorted values at one
  threshold, so all ``n - 1`` splits are scored at once from prefix sums and the best is
  taken; the centroids are the means of the two sides. "Fixed" refers to recovery
  training: the assignments stay as computed here and only the centroids are trained
  (``kmeans.centroid_gradient_step``).
* ``BSFlex`` -- flexible binarization: two trainable centroids per group plus trainable
  latent real weights; every forward pass re-assigns each latent weight to its nearest
  centroid, so weights can cross between clusters during recovery training. Gradients
  reach the latent weights through a straight-through estimator and the centroids as the
  scatter-add of their cluster's gradients.

Each result holds at most two distinct values per group: exactly two unless every weight
of the group falls into one cluster (a constant group; or, for BSFlex, latent weights
that all moved to one centroid).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tshrink_plugins.quant.kmeans import KMeansResult, group_view


def _groups(W: Tensor, group_size: int | None) -> Tensor:
    """``(G, N)`` view: one group per row, or per ``group_size`` weights of a row."""
    if group_size is None:
        return group_view(W, "row")
    return group_view(W, "group", group_size)


@dataclass
class SignResult:
    """Sign-with-scale binarization: ``w = scales[g] if signs else -scales[g]``.

    ``signs``: bool, shape of the weight (True = positive); ``scales``: ``(G,)``, >= 0,
    dtype of the weight; groups as in ``kmeans.group_view`` (G equal contiguous runs).
    """

    signs: Tensor  # shape of W, bool
    scales: Tensor  # (G,)

    def __post_init__(self) -> None:
        if self.signs.dtype != torch.bool:
            raise ValueError(f"signs must be a bool tensor, got {self.signs.dtype}")
        if self.scales.ndim != 1 or self.signs.numel() % self.scales.numel():
            raise ValueError(
                f"scales must be 1-D with a length dividing {self.signs.numel()}, got shape {tuple(self.scales.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        """Shape of the binarized weight."""
        return self.signs.shape

    def dequantize(self) -> Tensor:
        """The binarized weight ``±scale``, shape of the original."""
        g = self.scales.shape[0]
        s = self.scales[:, None]  # (G, 1)
        return torch.where(self.signs.reshape(g, -1), s, -s).reshape(self.signs.shape)


def binarize_sign(W: Tensor, group_size: int | None = None) -> SignResult:
    """``alpha * sign(W)`` per row (or group) with the L2-optimal ``alpha = mean|w|``."""
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {W.dtype}")
    X = _groups(W.detach(), group_size)  # (G, N)
    scales = X.double().abs().mean(dim=1).to(W.dtype)  # (G,)
    return SignResult(signs=(W.detach() >= 0), scales=scales)


def optimal_two_level(X: Tensor) -> tuple[Tensor, Tensor]:
    """Exact 2-means of each row of ``X`` ``(G, N)``.

    Returns ``(centroids (G, 2) float64 [low, high], idx (G, N) int64)``: idx 1 for
    values above the optimal threshold. Maximises the between-cluster sum of squares
    ``n_lo * n_hi / N * (mean_lo - mean_hi)^2`` over the splits between distinct sorted
    values (equivalently minimises the within-cluster error); ties -> the lowest split.
    """
    Xd = X.double()
    s = Xd.sort(dim=1).values  # (G, N)
    n = s.shape[1]
    if n == 1:
        return torch.cat([s, s], dim=1), torch.zeros_like(Xd, dtype=torch.int64)
    csum = s.cumsum(dim=1)  # (G, N)
    n_lo = torch.arange(1, n, dtype=torch.float64, device=X.device)  # (N-1,) size of the low side
    sum_lo = csum[:, :-1]  # (G, N-1)
    mean_lo = sum_lo / n_lo
    mean_hi = (csum[:, -1:] - sum_lo) / (n - n_lo)
    between = n_lo * (n - n_lo) * (mean_lo - mean_hi) ** 2  # (G, N-1), proportional to the SSE gain
    valid = s[:, :-1] < s[:, 1:]  # only split between distinct values
    split = torch.where(valid, between, torch.full_like(between, -1.0)).argmax(dim=1, keepdim=True)  # (G, 1)
    threshold = torch.gather(s, 1, split)  # (G, 1), largest value of the low side
    lo = torch.gather(mean_lo, 1, split)
    hi = torch.where(valid.any(dim=1, keepdim=True), torch.gather(mean_hi, 1, split), lo)  # constant row: one value
    return torch.cat([lo, hi], dim=1), (Xd > threshold).long()


def binarize_fixed(W: Tensor, group_size: int | None = None) -> KMeansResult:
    """1-bit k-means per row (or group): optimal two centroids, solved exactly.

    Returns a ``KMeansResult`` with codebook ``(G, 2)`` (low, high) and uint8 indices.
    """
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {W.dtype}")
    X = _groups(W.detach(), group_size)  # (G, N)
    if not torch.isfinite(X).all():
        raise ValueError("W contains NaN or inf; binarization needs finite weights")
    centroids, idx = optimal_two_level(X)
    return KMeansResult(
        codebook=centroids.to(W.dtype),
        indices=idx.to(torch.uint8).reshape(W.shape),
        iterations=1,
        converged=True,
    )


class BSFlex(nn.Module):
    """Flexible binarization for recovery training.

    Parameters: ``latent`` (shape of W, the real-valued weights, initialised to ``W``)
    and ``centroids`` ``(G, 2)`` (initialised by ``binarize_fixed``). Calling the module
    returns the binarized weight: each latent weight is assigned to its nearest centroid
    (ties -> centroid 0), so assignments follow the latent weights from step to step.
    Backward: the weight gradient is passed unchanged to ``latent`` (straight-through
    estimator) and summed per cluster into ``centroids``. Use with any optimiser, e.g.
    ``F.linear(x, bsflex())``; ``result()`` freezes the current state for storage.
    """

    def __init__(self, weight: Tensor, group_size: int | None = None) -> None:
        super().__init__()
        init = binarize_fixed(weight, group_size)
        self.group_size = group_size
        self.latent = nn.Parameter(weight.detach().clone())
        self.centroids = nn.Parameter(init.codebook.clone())  # (G, 2)

    def assignments(self) -> Tensor:
        """``(G, N)`` int64: index of the centroid nearest each latent weight."""
        X = self.latent.detach().reshape(self.centroids.shape[0], -1)  # (G, N)
        c = self.centroids.detach()
        return ((X - c[:, 1:]).abs() < (X - c[:, :1]).abs()).long()

    def forward(self) -> Tensor:
        """Binarized weight (shape of W), differentiable w.r.t. latent (STE) and centroids."""
        idx = self.assignments()
        X = self.latent.reshape(self.centroids.shape[0], -1)  # (G, N)
        q = torch.gather(self.centroids, 1, idx)  # (G, N), grad -> scatter-add into centroids
        return (q + (X - X.detach())).reshape(self.latent.shape)  # value q, grad identity to latent

    def result(self) -> KMeansResult:
        """Current binarization as a ``KMeansResult`` (codebook ``(G, 2)``, uint8 indices)."""
        return KMeansResult(
            codebook=self.centroids.detach().clone(),
            indices=self.assignments().to(torch.uint8).reshape(self.latent.shape),
            iterations=0,
            converged=False,
        )
