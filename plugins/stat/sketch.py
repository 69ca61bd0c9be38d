"""Streaming row sketches ``S A`` of tall activation matrices (pure torch, any device).

The ID of ``A`` (m tokens x n units) needs only the geometry of ``A``'s columns; a random
``S`` (s x m) with ``E[S^T S] = I`` keeps it, so the ID of ``S A`` (s x n, s independent of
m) picks columns and an interpolation matrix nearly as good as the ID of ``A`` (the
randomized ID of Liberty, Woolfe, Martinsson, Rokhlin and Tygert, PNAS 2007), and its
residuals estimate those of ``A``. Two sketches, both fed row batches through
``update`` and read with ``result``:

* ``GaussianSketch``: ``S`` has i.i.d. N(0, 1/s) entries; cost ``O(s n)`` per row.
* ``CountSketch``: each row goes to one random bucket with a random sign; cost ``O(n)``
  per row, but it needs more rows than a Gaussian sketch for the same quality.

Default size (``default_sketch_size``): ``s = factor * r + 10`` with ``r`` the largest rank
the caller will cut the ID to (``n`` when unknown, as when ``k`` is picked from the
residuals), ``factor = 2`` for Gaussian (the singular values of an ``s x r`` Gaussian
sketch of an r-dimensional subspace then lie within about ``1 +- sqrt(r/s) = 1 +- 0.71``,
and far closer on the leading directions that decide the pivots) and ``factor = 4`` for
CountSketch. tests/test_stat_math.py measures the resulting ID error against the exact ID.

Determinism: the random matrix is drawn batch by batch from a ``torch.Generator`` seeded
with ``seed`` on the data's device, so a result depends on the seed, the device and the
sequence of batch sizes (not only on the rows). On CUDA, CountSketch's scatter-add
(``index_put_(..., accumulate=True)``) may sum in a varying order, so the last bits can
vary run to run unless ``torch.use_deterministic_algorithms(True)`` is set.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .idecomp import check_finite

KINDS = ("gaussian", "countsketch")
SIZE_FACTOR = {"gaussian": 2, "countsketch": 4}  # rows of S per unit of target rank
SIZE_EXTRA = 10  # plain oversampling on top, as in the randomized ID


def default_sketch_size(n: int, kind: str, target_rank: int | None = None) -> int:
    """Sketch rows for an n-column matrix whose ID will be cut at rank <= ``target_rank``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of columns, got {n!r}")
    r = n if target_rank is None else target_rank
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= n:
        raise ValueError(f"target_rank must be an integer in [1, {n}] or None, got {target_rank!r}")
    return SIZE_FACTOR[kind] * r + SIZE_EXTRA


@dataclass(frozen=True)
class SketchConfig:
    """How big, which seed, which precision."""

    size: int | None = None  # rows of S A; None -> default_sketch_size(n, kind, target_rank)
    target_rank: int | None = None  # largest rank the ID will be cut to; None -> n (unknown)
    seed: int = 0  # seeds the torch.Generator on the data's device
    dtype: torch.dtype = torch.float64  # precision of the products and of the accumulator


class _RowSketch(ABC):
    """Shared plumbing: lazy allocation on the first batch's device, shape/finite checks."""

    kind = ""

    def __init__(self, n: int, config: SketchConfig = SketchConfig(), *,
                 device: torch.device | str | None = None) -> None:
        if config.size is None:
            size = default_sketch_size(n, self.kind, config.target_rank)
        else:
            size = config.size
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"SketchConfig.size must be a positive integer or None, got {size!r}")
            default_sketch_size(n, self.kind, config.target_rank)  # validates n, target_rank
        if not config.dtype.is_floating_point:
            raise ValueError(f"SketchConfig.dtype must be a floating dtype, got {config.dtype}")
        self.n, self.size, self.config = n, size, config
        self.rows = 0
        self._device = None if device is None else torch.device(device)
        self._Y: torch.Tensor | None = None  # (size, n)
        self._gen: torch.Generator | None = None

    def update(self, A_batch: torch.Tensor) -> None:
        """Add ``S_batch A_batch`` for a batch of rows (..., n); leading dims are flattened."""
        if not isinstance(A_batch, torch.Tensor) or A_batch.ndim < 1 or A_batch.shape[-1] != self.n:
            shape = tuple(A_batch.shape) if isinstance(A_batch, torch.Tensor) else type(A_batch).__name__
            raise ValueError(f"A_batch must be a tensor of shape (..., {self.n}), got {shape}")
        check_finite("A_batch", A_batch)
        if self._Y is None:
            dev = self._device or A_batch.device
            self._Y = torch.zeros(self.size, self.n, dtype=self.config.dtype, device=dev)
            self._gen = torch.Generator(device=dev)
            self._gen.manual_seed(self.config.seed)
        a = A_batch.detach().reshape(-1, self.n).to(self._Y.device, self.config.dtype)  # (b, n)
        if a.shape[0]:
            self._add(a)
        self.rows += a.shape[0]

    def result(self) -> torch.Tensor:
        """The sketch ``S A`` (size, n) so far (the live buffer, not a copy)."""
        if self._Y is None:
            raise ValueError(f"{type(self).__name__}.result() called before any update()")
        return self._Y

    @abstractmethod
    def _add(self, a: torch.Tensor) -> None:
        """Accumulate the sketch of the rows ``a`` (b, n) into ``self._Y``."""


class GaussianSketch(_RowSketch):
    """``S A`` with ``S`` (size, m) i.i.d. N(0, 1/size), drawn batch by batch."""

    kind = "gaussian"

    def _add(self, a: torch.Tensor) -> None:
        Y = self._Y
        S_b = torch.randn(a.shape[0], self.size, generator=self._gen, device=Y.device, dtype=Y.dtype)
        Y.addmm_(S_b.T, a, alpha=1.0 / math.sqrt(self.size))  # (size, b) @ (b, n)


class CountSketch(_RowSketch):
    """``S A`` with one +-1 per column of ``S`` (size, m): row i of A lands in bucket h(i)."""

    kind = "countsketch"

    def _add(self, a: torch.Tensor) -> None:
        Y = self._Y
        bucket = torch.randint(0, self.size, (a.shape[0],), generator=self._gen, device=Y.device)
        sign = torch.randint(0, 2, (a.shape[0],), generator=self._gen, device=Y.device).to(Y.dtype) * 2 - 1
        Y.index_put_((bucket,), a * sign[:, None], accumulate=True)  # Y[bucket[i]] += sign[i] a[i]
