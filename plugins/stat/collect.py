"""Streaming statistics of one projection's input over the real calibration tokens.

STAT needs, per layer, the geometry of the activations ``A`` (tokens x n) entering the down
projection (n neurons) and the output projection (n = units * group * head_dim). Storing
``A`` for every calibration token is what does not scale, so :class:`ColumnStats` keeps
only what the decompositions need, updated batch by batch while a
:class:`tshrink.calibration.LayerStream` runs the layer:

* ``sketch="none"``: the exact Gram ``G = A^T A`` (n x n, float64, as
  ``idecomp.GramAccumulator`` streams it) -- memory ``O(n^2)`` whatever the number of
  tokens, on the given device (GPU included);
* ``sketch="gaussian"`` / ``"countsketch"``: ``Y = S [A, 1]`` (s x (n+1)), a row sketch
  (``sketch.py``); the ones column is sketched too, so the centred sketch ``S (A - 1 mu^T)``
  can be formed afterwards.

Both also keep the exact column sums and the token count (for centring and bias folding).
Padding tokens are skipped; token rows holding NaN/inf are dropped and counted in
``dropped`` (the caller reports them), so one bad sequence cannot poison the statistics.

Column scaling: a scale is given per block of ``bs`` columns as a (nblocks, bs, bs)
tensor ``M`` of symmetric blocks; the scaled activations are ``A M`` (block diagonal).
"""
from __future__ import annotations

import torch

from .sketch import CountSketch, GaussianSketch, SketchConfig, default_sketch_size

SKETCHES = ("none", "gaussian", "countsketch")
_F64 = torch.float64


class ColumnStats:
    """Gram or sketch of the rows of ``A`` (tokens x ``n``) plus exact column sums."""

    def __init__(self, n: int, *, sketch: str = "none", size: int = 0, target_rank: int | None = None,
                 seed: int = 0, device: torch.device | str | None = None) -> None:
        if sketch not in SKETCHES:
            raise ValueError(f"stat_sketch={sketch!r} is not one of {SKETCHES}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"stat_sketch_size={size!r} must be an integer >= 0 (0 = the default size)")
        self.n, self.kind, self.requested = n, sketch, sketch
        self.route = "gram"  # what is actually kept: "gram" or "<kind>(<rows> rows)"
        self.note = ""  # why a requested sketch was not used
        if sketch != "none":
            target = None if target_rank is None else max(1, min(int(target_rank) + 1, n + 1))
            rows = size or default_sketch_size(n + 1, sketch, target)
            if target_rank is None:  # scoring needs the error at every width: a sketch of rank n
                self.kind, self.note = "none", "no target rank (scoring needs every width): exact Gram"
            elif rows >= n:  # s x n sketch >= the n x n Gram in memory, updates and decomposition
                self.kind, self.note = "none", f"{rows} sketch rows >= {n} columns: exact Gram (cheaper)"
            elif rows <= target_rank:  # cannot pin down the kept columns
                self.kind, self.note = "none", f"{rows} sketch rows <= kept width {target_rank}: exact Gram"
            else:
                self.route = f"{sketch}({rows} rows)"
        sketch = self.kind
        self.count = 0  # rows used
        self.dropped = 0  # real-token rows dropped for NaN/inf
        self.sum = torch.zeros(n, dtype=_F64, device=device)  # (n,)
        self._G = torch.zeros(n, n, dtype=_F64, device=device) if sketch == "none" else None  # (n, n)
        if sketch != "none":
            cfg = SketchConfig(size=size or None, target_rank=target, seed=seed)
            cls = GaussianSketch if sketch == "gaussian" else CountSketch
            self._acc = cls(n + 1, cfg, device=device)

    def update(self, x: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Add the rows of ``x`` (batch, seq, n) at real tokens (``token_mask`` (batch, seq))."""
        rows64 = x[token_mask.bool()].reshape(-1, self.n).to(self.sum.device, _F64)  # (tokens, n)
        # a float64 row sum is finite iff the (float32/16) row is: one check per token
        ok = torch.isfinite(rows64.sum(-1))
        if not bool(ok.all()):
            self.dropped += int((~ok).sum())
            rows64 = rows64[ok]
        if rows64.shape[0] == 0:
            return
        self.sum += rows64.sum(0)
        self.count += rows64.shape[0]
        if self._G is not None:  # rows are finite already: no second check (GramAccumulator's)
            self._G.addmm_(rows64.T, rows64)
        else:
            self._acc.update(torch.cat([rows64, rows64.new_ones(rows64.shape[0], 1)], 1))

    @property
    def mean(self) -> torch.Tensor:
        """(n,) column means over the rows used."""
        return self.sum / max(self.count, 1)

    def _sketch(self, center: bool) -> torch.Tensor:
        Y = self._acc.result()  # (s, n+1)
        return Y[:, : self.n] - Y[:, self.n :] * self.mean[None, :] if center else Y[:, : self.n]

    def gram(self, center: bool) -> torch.Tensor:
        """(n, n) float64: ``A^T A`` (or ``(A - 1 mu^T)^T (A - 1 mu^T)`` when ``center``);
        exact, or ``Y^T Y`` estimated from the sketch."""
        if self.kind != "none":
            Y = self._sketch(center)
            return Y.T @ Y
        G = self._G
        return G - torch.outer(self.sum, self.sum) / max(self.count, 1) if center else G.clone()

    def gram_rows(self, center: bool, cols: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(G[K], trace(G))``: the kept rows (|K|, n) of the (centred) Gram and its trace,
        without forming the n x n Gram from a sketch (``Y_K^T Y``)."""
        K = cols.to(self.sum.device).long()
        if self.kind != "none":
            Y = self._sketch(center)  # (s, n)
            return Y[:, K].T @ Y, float(Y.pow(2).sum())
        G, c = self._G, max(self.count, 1)
        rows, trace = G[K], float(G.diagonal().sum())
        if center:
            rows = rows - torch.outer(self.sum[K], self.sum) / c
            trace -= float(self.sum.pow(2).sum()) / c
        return rows, trace

    def scaled(self, center: bool, M: torch.Tensor) -> tuple[str, torch.Tensor]:
        """The scaled statistic: ``("gram", M G M)`` (n, n) or ``("sketch", Y M)`` (s, n)."""
        if self.kind == "none":
            return "gram", scale_gram(self.gram(center), M)
        Y = self._sketch(center)  # (s, n)
        nb, bs, _ = M.shape
        return "sketch", torch.einsum("sai,aij->saj", Y.reshape(-1, nb, bs), M.to(Y)).reshape(Y.shape)


def scale_gram(G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``M G M`` for block-diagonal symmetric ``M`` given as (nblocks, bs, bs)."""
    nb, bs, _ = M.shape
    M = M.to(G)
    if bs == 1:
        d = M.reshape(-1)
        return d[:, None] * G * d[None, :]
    G4 = G.reshape(nb, bs, nb, bs)
    return torch.einsum("aij,ajbk,bkl->aibl", M, G4, M).reshape(G.shape)


def stream_energy(hidden: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    """Typical energy of a layer's input over its real tokens: the token count times the
    median of ``||h_t||^2`` (finite tokens). The median, not the sum: in Llama-style models a
    few tokens (e.g. each sequence's first) carry "massive activations" from the middle
    layers on -- measured on SmolLM2, 8 of 2048 tokens hold 99 % of the sum from layer 12 --
    and a sum would make every later layer look unimportant."""
    energies = []
    for h, m in zip(hidden, masks):
        e = h[m.to(h.device).bool()].to(_F64).pow(2).sum(-1)  # (tokens,)
        energies.append(e[torch.isfinite(e)].cpu())
    e = torch.cat(energies)
    return float(e.median()) * e.numel() if e.numel() else 0.0
