"""Choosing units under a FLOPs budget (pure math over scores and the cost model).

Two generic selectors, used by the built-in ``global`` and ``uniform`` select stages and
available to any plugin:

- :func:`select_global` ranks every unit of the model on one list. Raw scores of heads and
  neurons are not commensurable, so by default each is divided by the mean score of its
  kind (``normalize="kind"``), or of its kind within its layer (``"layer"``); with
  ``per_cost=True`` the rank is score per MAC (for scores that are already in common units,
  e.g. output-error estimates). Units are taken greedily while they fit the budget.
- :func:`select_uniform` keeps the same fraction of heads and of neurons in every layer, the
  largest fraction that fits, and the best-scored units inside each layer.

:func:`allocate_options` chooses one option per menu of ``(macs, error)`` pairs (units of
unequal cost, e.g. a GQA layer's kept groups x query heads per group) by error per MAC on the
lower convex hulls; :func:`select_query_units` uses it for unit scores with query-head units.

:func:`keep_query_heads` adds query-head units under grouped-query attention to a selection:
``g'`` best-scored query heads in every kept KV group of a layer.

:func:`equalize_experts` makes a selection valid for mixture-of-experts layers (the same
number of neurons kept in every expert): the host applies it after every select / refine stage.
"""
from __future__ import annotations

import torch

from .cost import CostModel
from .units import Selection, UnitScores

NORMALIZE = ("kind", "layer", "none")


def _normalised(scores: UnitScores, normalize: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r} is not one of {NORMALIZE}")
    out = []
    for kind in (scores.heads, scores.neurons):
        kind = [s.double().clamp_min(0) for s in kind]
        if normalize == "kind":
            flat = torch.cat(kind) if kind else torch.zeros(0)
            mean = flat.mean() if flat.numel() else torch.tensor(1.0)
            kind = [s / mean.clamp_min(1e-30) for s in kind]
        elif normalize == "layer":
            kind = [s / s.mean().clamp_min(1e-30) if s.numel() else s for s in kind]
        out.append(kind)
    return out[0], out[1]


def select_global(scores: UnitScores, cost: CostModel, budget: float, *, normalize: str = "kind",
                  per_cost: bool = False) -> Selection:
    """Greedy global ranking of all units within ``budget`` (kept fraction of layer MACs)."""
    allowed = cost.budget_macs(budget) - sum(c.fixed for c in cost.layers)
    heads, neurons = _normalised(scores, normalize)
    prio, unit_cost, owner = [], [], []
    for layer, (h, n) in enumerate(zip(heads, neurons)):
        c = cost.layers[layer]
        for kind, s, per in ((0, h, c.head), (1, n, c.neuron)):
            if s.numel():
                prio.append(s / per if per_cost else s)
                unit_cost.append(torch.full((s.numel(),), float(per), dtype=torch.float64))
                owner.append(torch.stack([torch.full((s.numel(),), layer), torch.full((s.numel(),), kind),
                                          torch.arange(s.numel())], 1))
    sel = Selection([[] for _ in heads], [[] for _ in neurons])
    if not prio:
        return sel
    prio_t, cost_t, owner_t = torch.cat(prio), torch.cat(unit_cost), torch.cat(owner)
    # stable descending order: ties keep layer/kind/index order, so results are deterministic
    order = torch.sort(-prio_t, stable=True).indices
    spent = 0.0
    for i in order.tolist():
        if spent + cost_t[i].item() <= allowed + 1e-6:
            spent += cost_t[i].item()
            layer, kind, idx = owner_t[i].tolist()
            (sel.heads if kind == 0 else sel.neurons)[layer].append(idx)
    return Selection(sel.heads, sel.neurons)


def select_uniform(scores: UnitScores, cost: CostModel, budget: float) -> Selection:
    """The same kept fraction of heads and neurons in every layer (largest that fits)."""
    allowed = cost.budget_macs(budget)

    def pick(frac: float) -> Selection:
        keep = lambda s: torch.sort(-s.double(), stable=True).indices[: int(round(frac * s.numel()))].tolist()
        return Selection([keep(s) for s in scores.heads], [keep(s) for s in scores.neurons])

    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection on the fraction; cost is monotone in it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost.macs(pick(mid)) <= allowed else (lo, mid)
    return pick(lo)


def keep_query_heads(selection: Selection, scores: list[torch.Tensor], groups: list[int],
                     per_group: list[int]) -> Selection:
    """``selection`` plus, in every layer ``l``, the ``per_group[l]`` best-scored query heads
    of each kept unit (``scores[l]`` has one score per query head, ``(units_l * groups[l],)``;
    ties keep the lower index). ``per_group[l] == groups[l]`` keeps them all."""
    query = []
    for layer, (kept, s, g, k) in enumerate(zip(selection.heads, scores, groups, per_group)):
        if not 1 <= k <= g:
            raise ValueError(f"layer {layer}: keep {k} query heads per group, expected 1..{g}")
        if s.shape != (s.numel(),) or s.numel() % g:
            raise ValueError(f"layer {layer}: query-head scores of shape {tuple(s.shape)} for groups of {g}")
        s = s.double().reshape(-1, g)  # (units, group)
        query.append(sorted(u * g + int(j) for u in kept for j in torch.sort(-s[u], stable=True).indices[:k]))
    return Selection(selection.heads, selection.neurons, query)


def equalize_experts(selection: Selection, neuron_scores: list[torch.Tensor],
                     experts: list[int | None]) -> tuple[Selection, dict[int, tuple[list[int], int]]]:
    """``selection`` with, in every mixture-of-experts layer ``l`` (``experts[l]`` routed experts of
    ``n / E`` neurons each), ``k = floor(kept / E)`` neurons per expert: the layer's kept count
    decides ``k`` (aggregated over experts), each expert then keeps its own ``k`` best-scored
    neurons (ties: lower index). In such a layer every neuron costs the same, so the cost never
    rises. Returns the selection and, per changed layer, (kept per expert before, ``k``)."""
    neurons, changed = [], {}
    for layer, (kept, s, E) in enumerate(zip(selection.neurons, neuron_scores, experts)):
        if E is None:
            neurons.append(kept)
            continue
        per = s.numel() // E
        counts = [0] * E
        for i in kept:
            counts[i // per] += 1
        k = len(kept) // E
        if len(set(counts)) == 1:
            neurons.append(kept)
            continue
        s = s.double().reshape(E, per)
        neurons.append(sorted(e * per + int(j) for e in range(E) for j in torch.sort(-s[e], stable=True).indices[:k]))
        changed[layer] = (counts, k)
    return Selection(selection.heads, neurons, selection.query_heads), changed
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

    Every menu starts at its cheapest option. The moves along each menu's lower convex hull
    (of its Pareto front) are prioritised by their slope (error reduction per MAC) and taken
    greedily while they fit; a move that does not fit stops its menu. A menu of equally
    spaced costs moves one option at a time (each with its hull segment's slope).
    Then the budget left is filled: repeatedly the single jump (to any option of any menu)
    with the largest error reduction that fits. On curves of equal unit costs this is
    exactly STAT's ``allocate_global`` (the test checks it). Returns the chosen option index
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
        # equal unit costs (a width curve): every unit of a hull segment is a move of its own, as
        # in the width allocation; unequal costs: a segment is one move (its inner points lie
        # above the hull, poor places to stop; the fill below covers a segment that did not fit)
        steps_of = [c[k] - c[k - 1] for k in range(1, len(c))]
        even = all(abs(x - steps_of[0]) <= 1e-9 * max(abs(steps_of[0]), 1.0) for x in steps_of)
        for a, b in zip(hull[:-1], hull[1:]):
            slope = max((e[a] - e[b]) / (c[b] - c[a]), 0.0)
            steps.extend((slope, m, k, k - 1) for k in range(a + 1, b + 1)) if even else steps.append((slope, m, b, a))
    pos = [0] * len(menus)
    spent = sum(float(menus[m][f[0]][0]) for m, f in enumerate(fronts))
    if spent > allowed + 1e-6:
        raise ValueError(f"the cheapest options cost {spent:.4g} MACs, more than the {allowed:.4g} allowed")
    blocked = [False] * len(menus)
    for _, m, k, start in sorted(steps, key=lambda s: -s[0]):  # stable: ties keep menu, then position order
        if blocked[m] or pos[m] != start:
            continue
        f, opts = fronts[m], menus[m]
        extra = float(opts[f[k]][0]) - float(opts[f[start]][0])
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


ATTENTION_UNITS = ("group", "query", "both")


def select_query_units(scores: UnitScores, query_scores: list[torch.Tensor], cost: CostModel, budget: float,
                       mode: str, *, normalize: str = "kind") -> Selection:
    """Global selection with query-head units under grouped-query attention.

    Scores are normalised as in :func:`select_global` (group units, query heads and neurons
    are three kinds). A layer's options are ``(U', g')``: ``mode="query"`` keeps all ``U``
    groups and ``g' = 1..g`` query heads in each, ``"both"`` also ``U' = 0..U`` groups. For
    ``g'`` a group's value is its score plus its ``g'`` best query heads' scores; the ``U'``
    best groups are kept. The option's *error* is the normalised score it removes, and
    :func:`allocate_options` trades options and neurons (a prefix of the best-scored) by
    removed score per MAC under the budget. Multi-head layers (``g == 1``) get the group
    options. ``query_scores[l]`` has shape ``(units_l * group_l,)``."""
    if mode not in ATTENTION_UNITS:
        raise ValueError(f"attention units {mode!r} is not one of {ATTENTION_UNITS}")
    heads, neurons = _normalised(scores, normalize)
    queries, _ = _normalised(UnitScores(list(query_scores), []), normalize)
    allowed = cost.budget_macs(budget) - sum(c.fixed for c in cost.layers)
    menus, labels = [], []
    for layer, c in enumerate(cost.layers):
        s, q, g = heads[layer], queries[layer], cost.groups[layer]
        U = s.numel()
        if q.numel() != U * g:
            raise ValueError(f"layer {layer}: {q.numel()} query-head scores for {U} units of {g} query heads")
        opts = []  # (units kept, heads per group, kept query heads, removed score)
        total = float(s.sum() + q.sum())
        q = q.reshape(U, g)
        rank = torch.sort(-q, dim=1, stable=True).indices  # (U, g), best first
        sizes = [g] if g == 1 or mode == "group" else range(1, g + 1)
        for gp in sizes:
            value = s + q.gather(1, rank[:, :gp]).sum(1)  # (U,)
            order = torch.sort(-value, stable=True).indices.tolist()
            counts = [U] if mode == "query" and g > 1 else range(0 if gp == g else 1, U + 1)
            for t in counts:
                kept = order[:t]
                opts.append((t, gp, sorted(u * g + int(j) for u in kept for j in rank[u, :gp]),
                             total - float(value[kept].sum())))
        menus.append([(float(t * (c.kv + gp * c.query_head)), err) for t, gp, _, err in opts])
        labels.append(opts)
        n = neurons[layer]
        suffix = torch.cat([torch.sort(n, descending=True).values.flip(0).cumsum(0).flip(0), n.new_zeros(1)])
        menus.append([(float(k * c.neuron), float(suffix[k])) for k in range(n.numel() + 1)])
        labels.append(torch.sort(-n, stable=True).indices)
    chosen = allocate_options(menus, allowed)
    sel_heads, sel_neurons, query = [], [], []
    for layer in range(len(cost.layers)):
        t, gp, kept, _ = labels[2 * layer][chosen[2 * layer]]
        sel_heads.append(sorted({h // cost.groups[layer] for h in kept}))
        query.append(kept if t and gp < cost.groups[layer] else None)
        sel_neurons.append(labels[2 * layer + 1][: chosen[2 * layer + 1]].tolist())
    return Selection(sel_heads, sel_neurons, query if any(x is not None for x in query) else None)
