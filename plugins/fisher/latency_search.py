"""Mask search under a latency budget (Kwon et al. 2022, section 4.2 "latency-aware").

A sub-layer's latency is read from a look-up table measured on the target device (one
entry per kept head count / neuron count, ``latency_table.py``) and approximated by the
paper's piecewise-linear function of the kept count ``n``:

    lat(0) = 0 (sub-layer removed);  lat(n) = c for 1 <= n <= t;  lat(n) = c + slope * (n - t) for n > t

``fit_piecewise`` picks ``t`` (the threshold below which fewer units do not run faster),
``c`` and ``slope`` by least squares, as the public code's ``fit_latency_fn``.

Search (``search_latency``), the paper's algorithm: in every sub-layer that is kept, its
``t`` locally most important units are free once ``c`` is paid; so for every number
``a`` of attention sub-layers and ``f`` of MLP sub-layers removed (the ones whose top-``t``
importance is smallest), the fixed cost is ``(L-a) c_h + (L-f) c_n`` and the rest of the
budget buys further units at ``slope`` each, ranked globally by importance (the FLOPs
search, ``search.search_mask``). The best total importance over all ``(a, f)`` wins.

Unlike the public code, the budget is the same for every ``(a, f)``: its ``max_latency``
is reassigned inside the double loop (``max_latency = max_latency - fixed``), so the
budget shrinks at every iteration and later candidates are judged against a budget that
is too small (or skipped). The result is then checked against the TABLE (the fit can
under-estimate it); when the table says the budget is exceeded, the search is repeated
with the budget lowered by the overshoot until it holds. A budget below the cost of the
smallest selection (every sub-layer removed: the per-layer overhead alone) is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .search import search_mask


@dataclass(frozen=True)
class Piecewise:
    """lat(0)=0, lat(n)=c for 1<=n<=t, c + slope*(n-t) above (ms)."""

    threshold: int
    c: float
    slope: float

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        return self.c + self.slope * max(0, n - self.threshold)


def fit_piecewise(lut: Sequence[float]) -> Piecewise:
    """Least-squares piecewise-linear fit of ``lut`` (``lut[i]`` = latency with ``i+1`` units):
    for every threshold ``t``, ``c`` = mean of the first ``t`` entries and ``slope`` >= 0 the
    least-squares slope of the rest through ``(t, c)``; the ``t`` of smallest squared error."""
    y = torch.as_tensor(list(lut), dtype=torch.float64)
    if y.ndim != 1 or y.numel() == 0 or not torch.isfinite(y).all():
        raise ValueError(f"a latency table must be a non-empty list of finite numbers, got {list(lut)[:8]}")
    n = y.numel()
    best: tuple[float, Piecewise] | None = None
    for t in range(1, n + 1):
        c = float(y[:t].mean())
        rest = y[t:] - c
        x = torch.arange(1, rest.numel() + 1, dtype=torch.float64)
        slope = float((x * rest).sum() / (x * x).sum()) if rest.numel() else 0.0
        slope = max(slope, 0.0)
        approx = torch.cat([torch.full((t,), c, dtype=torch.float64), c + slope * x])
        err = float((y - approx).pow(2).sum())
        if best is None or err < best[0] - 1e-15:
            best = (err, Piecewise(t, c, slope))
    assert best is not None
    return best[1]


def table_latency(lut: Sequence[float], n: int) -> float:
    """The table's latency for ``n`` kept units (0: removed)."""
    return 0.0 if n <= 0 else float(lut[min(n, len(lut)) - 1])


def estimate(head_lut: Sequence[float], neuron_lut: Sequence[float], base: float, heads: Sequence[int],
             neurons: Sequence[int]) -> float:
    """Estimated latency of a model with these per-layer widths: per layer ``base`` (what
    remains with both sub-layers removed) plus the two table entries."""
    return sum(base + table_latency(head_lut, h) + table_latency(neuron_lut, n) for h, n in zip(heads, neurons))


def _search_fit(head_imp: list[Tensor], neuron_imp: list[Tensor], hf: Piecewise, nf: Piecewise,
                budget: float) -> tuple[list[Tensor], list[Tensor]] | None:
    """The best masks under ``budget`` (units only, no base) by the fitted functions; None if none fits."""
    L = len(head_imp)

    def local(imps: list[Tensor], t: int) -> tuple[list[Tensor], Tensor]:
        order = [torch.sort(x, descending=True, stable=True).indices for x in imps]
        base = torch.stack([x[o[:t]].sum() for x, o in zip(imps, order)]) if imps else torch.zeros(0)
        return order, base

    h_order, h_base = local(head_imp, hf.threshold)
    n_order, n_base = local(neuron_imp, nf.threshold)
    h_drop = torch.sort(h_base, stable=True).indices.tolist()  # least important sub-layers first
    n_drop = torch.sort(n_base, stable=True).indices.tolist()
    tiny = 1e-12 * max(budget, 1e-300)  # a zero slope: extra units are (nearly) free
    best: tuple[float, list[Tensor], list[Tensor]] | None = None
    for a in range(L + 1):
        h_gone = set(h_drop[:a])
        for f in range(L + 1):
            n_gone = set(n_drop[:f])
            rem = budget - (L - a) * hf.c - (L - f) * nf.c  # the same budget for every (a, f)
            if rem < 0:
                continue
            # extra units beyond the free top-t of every kept sub-layer, ranked globally
            h_extra = [torch.zeros(0, dtype=torch.float64) if l in h_gone else head_imp[l][h_order[l][hf.threshold:]]
                       for l in range(L)]
            n_extra = [torch.zeros(0, dtype=torch.float64) if l in n_gone else
                       neuron_imp[l][n_order[l][nf.threshold:]] for l in range(L)]
            hm, nm = search_mask(h_extra, n_extra, max(hf.slope, tiny), max(nf.slope, tiny), rem)
            score = sum(float(h_base[l]) for l in range(L) if l not in h_gone)
            score += sum(float(n_base[l]) for l in range(L) if l not in n_gone)
            score += sum(float(x[m].sum()) for x, m in zip(h_extra + n_extra, hm + nm))
            if best is None or score > best[0]:
                heads, neurons = [], []
                for l in range(L):
                    for imps, order, t, gone, extra, out in (
                            (head_imp, h_order, hf.threshold, h_gone, hm, heads),
                            (neuron_imp, n_order, nf.threshold, n_gone, nm, neurons)):
                        keep = torch.zeros(imps[l].numel(), dtype=torch.bool)
                        if l not in gone:
                            keep[order[l][:t]] = True
                            keep[order[l][t:][extra[l]]] = True
                        out.append(keep)
                best = (score, heads, neurons)
    return None if best is None else (best[1], best[2])


def search_latency(head_imp: Sequence[Tensor], neuron_imp: Sequence[Tensor], head_lut: Sequence[float],
                   neuron_lut: Sequence[float], base: float, budget: float,
                   max_rounds: int = 50) -> tuple[list[Tensor], list[Tensor], dict[str, float]]:
    """Boolean per-layer head / neuron masks of largest Fisher importance whose latency
    by the TABLE (``estimate``) is at most ``budget`` (ms, absolute; includes the
    per-layer ``base``). ``head_lut`` / ``neuron_lut``: latency of one sub-layer with
    ``1..len`` units. Raises ValueError when no selection can meet ``budget``."""
    head_imp = [torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in head_imp]
    neuron_imp = [torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in neuron_imp]
    L = len(head_imp)
    if len(neuron_imp) != L:
        raise ValueError(f"head and neuron importances for {L} / {len(neuron_imp)} layers")
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"latency budget must be a finite number >= 0 (ms), got {budget!r}")
    floor = L * base
    if budget < floor:
        raise ValueError(f"latency budget {budget:.4g} ms cannot be met: even with every attention and MLP "
                         f"sub-layer removed the layers take {floor:.4g} ms by the table")
    full_h = [torch.ones(x.numel(), dtype=torch.bool) for x in head_imp]
    full_n = [torch.ones(x.numel(), dtype=torch.bool) for x in neuron_imp]
    dense = estimate(head_lut, neuron_lut, base, [x.numel() for x in head_imp], [x.numel() for x in neuron_imp])
    if dense <= budget:  # nothing to remove (the fit may over-estimate the table at full width)
        return full_h, full_n, {"estimated_ms": dense, "budget_ms": budget, "searched_ms": budget}
    hf, nf = fit_piecewise(head_lut), fit_piecewise(neuron_lut)
    target = budget - floor
    for _ in range(max_rounds):
        found = _search_fit(head_imp, neuron_imp, hf, nf, target)
        if found is None:
            break
        hm, nm = found
        est = estimate(head_lut, neuron_lut, base, [int(m.sum()) for m in hm], [int(m.sum()) for m in nm])
        if est <= budget * (1 + 1e-12):
            return hm, nm, {"estimated_ms": est, "budget_ms": budget, "searched_ms": target + floor}
        target -= max(est - budget, 1e-9 * max(budget, 1.0))  # the fit under-estimated the table
        if target < 0:
            break
    empty_h = [torch.zeros(x.numel(), dtype=torch.bool) for x in head_imp]
    empty_n = [torch.zeros(x.numel(), dtype=torch.bool) for x in neuron_imp]
    return empty_h, empty_n, {"estimated_ms": floor, "budget_ms": budget, "searched_ms": floor}
