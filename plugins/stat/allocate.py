"""Per-layer widths from error curves under one FLOPs budget (pure math, no model).

Input: for every layer and kind (attention units, MLP neurons) an *error curve*
``e[k]``, k = 0..n: the estimated output error energy left when the layer keeps the first
``k`` units of its decomposition's pivot order (nonincreasing, ``e[n] = 0``), in units
comparable across layers and kinds (see ``prune.py``), and the cost model's MACs per unit.

Global allocation minimises ``sum_curves e[k_c]`` subject to the MACs budget by greedy
marginal error reduction per MAC on the lower convex hull of each curve: every unit gets
the slope of the hull segment it lies on (its *gain*; nonincreasing along the pivot order),
and units are taken in order of gain / MAC while they fit. On the hull this greedy is the
Lagrangian optimum (for every multiplier it picks the widths minimising
``sum e + lambda * MACs``); the budget left over by the last segment is filled by smaller
units that still fit. Since units of one curve cost the same and their gains do not
increase, each curve keeps a prefix of its pivot order. The budget is never exceeded.
"""
from __future__ import annotations

import math

import torch

from tshrink.selection import allocate_options  # noqa: F401 - the generic option allocator, re-exported

ALLOCATIONS = ("global", "uniform")


def hull_gains(errors: torch.Tensor) -> torch.Tensor:
    """(n,) error reduction of each unit along the order, from the lower convex hull of
    the points ``(k, errors[k])`` (n+1,): nonincreasing, >= 0, summing to ``e[0] - e[n]``."""
    e = [float(v) for v in errors.detach().double().cpu()]
    if len(e) < 1 or not all(math.isfinite(v) for v in e):
        raise ValueError(f"error curve must be a non-empty finite 1-D tensor, got {errors!r}")
    hull: list[int] = []  # indices of the lower hull, left to right
    for k in range(len(e)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> k
            if (e[b] - e[a]) * (k - a) >= (e[k] - e[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(k)
    gains = torch.zeros(len(e) - 1, dtype=torch.float64)
    for a, b in zip(hull[:-1], hull[1:]):
        gains[a:b] = max((e[a] - e[b]) / (b - a), 0.0)
    return gains


def allocate_global(curves: list[torch.Tensor | None], unit_macs: list[int], allowed: float,
                    floors: list[int] | None = None) -> list[int | None]:
    """Widths per curve maximising the total error reduction within ``allowed`` MACs.

    ``curves[c]`` (n_c+1,) error curve (``None``: a curve that is not pruned -- it keeps all
    its units, whose cost the caller has already taken out of ``allowed``; its width is None).
    ``floors[c]``: units curve ``c`` keeps whatever their gain (a per-layer minimum width);
    they are paid first, the rest of the budget goes to the greedy. ValueError when the
    floors alone exceed ``allowed``.
    """
    if len(curves) != len(unit_macs):
        raise ValueError(f"{len(curves)} curves but {len(unit_macs)} unit costs")
    floors = floors or [0] * len(curves)
    if len(floors) != len(curves):
        raise ValueError(f"{len(floors)} floors for {len(curves)} curves")
    floors = [0 if curve is None else max(0, min(int(f), curve.numel() - 1)) for f, curve in zip(floors, curves)]
    floor_macs = float(sum(f * m for f, m in zip(floors, unit_macs)))
    if floor_macs > allowed + 1e-6:
        raise ValueError(f"the minimum widths cost {floor_macs:.4g} MACs, more than the {allowed:.4g} the budget "
                         "leaves for the pruned units; lower the width floor or raise the budget")
    prio, owner = [], []
    for c, (curve, macs) in enumerate(zip(curves, unit_macs)):
        if curve is None or curve.numel() <= 1:
            continue
        if macs <= 0:
            raise ValueError(f"unit cost of curve {c} must be a positive number of MACs, got {macs}")
        g = hull_gains(curve)[floors[c]:]  # (n - floor,): the floor's units are kept anyway
        prio.append(g / macs)
        owner.append(torch.full((g.numel(),), c, dtype=torch.long))
    widths: list[int | None] = [None if curve is None else floors[c] for c, curve in enumerate(curves)]
    if prio:
        prio_t, owner_t = torch.cat(prio), torch.cat(owner)
        order = torch.sort(-prio_t, stable=True).indices  # ties: curve order, then pivot position
        spent = floor_macs
        for c in owner_t[order].tolist():
            if spent + unit_macs[c] <= allowed + 1e-6:
                spent += unit_macs[c]
                widths[c] += 1  # type: ignore[operator]
    return widths


def allocate_uniform(sizes: list[int | None], unit_macs: list[int], allowed: float) -> list[int | None]:
    """The same kept fraction in every pruned curve (``sizes[c]`` units, ``None``: not
    pruned), the largest fraction whose MACs fit ``allowed``."""

    def widths(frac: float) -> list[int | None]:
        return [None if n is None else int(round(frac * n)) for n in sizes]

    def macs(ws: list[int | None]) -> float:
        return float(sum(w * m for w, m in zip(ws, unit_macs) if w))

    lo, hi = 0.0, 1.0
    if macs(widths(1.0)) <= allowed + 1e-6:
        return widths(1.0)
    for _ in range(50):  # bisection: MACs are monotone in the fraction
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(widths(mid)) <= allowed + 1e-6 else (lo, mid)
    return widths(lo)

