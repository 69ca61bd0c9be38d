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
