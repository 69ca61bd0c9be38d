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


def _front(options: list[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto front by cost (cheapest first; an option is dropped when a
    cheaper or equally cheap one has no larger error)."""
    idx = sorted(range(len(options)), key=lambda i: (options[i][0], options[i][1], i))
    front: list[int] = []
    for i in idx:
        if front and (options[i][0] == options[front[-1]][0] or options[i][1] > options[front[-1]][1]):
            continue
        front.append(i)
    return front


def allocate_options(menus: list[list[tuple[float, float]]], allowed: float) -> list[int]:
    """One option per menu (``(macs, error)`` pairs) minimising the summed error within
    ``allowed`` MACs: the generalisation of :func:`allocate_global` to units of unequal cost
    (e.g. a GQA layer's ``(kept groups, query heads per group)`` options).

    Every menu starts at its cheapest option. The moves along each menu's Pareto front are
    prioritised by the slope of the lower convex hull segment they lie on (error reduction
    per MAC) and taken greedily while they fit; a move that does not fit stops its menu.
    Then the budget left is filled: repeatedly the single jump (to any option of any menu)
    with the largest error reduction that fits. On curves of equal unit costs this is
    exactly :func:`allocate_global` (the test checks it). Returns the chosen option index
    per menu; ValueError when the cheapest options alone exceed ``allowed``.
    """
    fronts, steps = [], []  # steps: (priority, menu, position on the front)
    for m, options in enumerate(menus):
        if not options:
            raise ValueError(f"menu {m} has no option")
        f = _front(options)
        fronts.append(f)
        c = [float(options[i][0]) for i in f]
        e = [float(options[i][1]) for i in f]
        hull: list[int] = []
        for k in range(len(f)):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (e[b] - e[a]) * (c[k] - c[a]) >= (e[k] - e[a]) * (c[b] - c[a]):
                    hull.pop()
                else:
                    break
            hull.append(k)
        for a, b in zip(hull[:-1], hull[1:]):
            slope = max((e[a] - e[b]) / (c[b] - c[a]), 0.0)
            steps.extend((slope, m, k) for k in range(a + 1, b + 1))
    pos = [0] * len(menus)
    spent = sum(float(menus[m][f[0]][0]) for m, f in enumerate(fronts))
    if spent > allowed + 1e-6:
        raise ValueError(f"the cheapest options cost {spent:.4g} MACs, more than the {allowed:.4g} allowed")
    blocked = [False] * len(menus)
    for _, m, k in sorted(steps, key=lambda s: -s[0]):  # stable: ties keep menu, then position order
        if blocked[m] or pos[m] != k - 1:
            continue
        f, opts = fronts[m], menus[m]
        extra = float(opts[f[k]][0]) - float(opts[f[k - 1]][0])
        if spent + extra <= allowed + 1e-6:
            spent += extra
            pos[m] = k
        else:
            blocked[m] = True
    chosen = [f[p] for f, p in zip(fronts, pos)]
    while True:  # fill what is left with the best single jump that fits
        best = None
        for m, opts in enumerate(menus):
            cost0, err0 = float(opts[chosen[m]][0]), float(opts[chosen[m]][1])
            for i, (cost, err) in enumerate(opts):
                gain = err0 - float(err)
                if gain > 0 and spent - cost0 + float(cost) <= allowed + 1e-6 and (best is None or gain > best[0]):
                    best = (gain, m, i, float(cost) - cost0)
        if best is None:
            return chosen
        _, m, i, extra = best
        chosen[m], spent = i, spent + extra
