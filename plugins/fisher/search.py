"""Mask search under a cost budget (Kwon et al. 2022, Algorithm 1, per-unit costs).

The paper keeps the globally most important heads and neurons (importance = Fisher
diagonal, ``fisher_math.fisher_importance``). Every head costs the same and every neuron
costs the same, so for each number ``h`` of kept heads the remaining budget buys a fixed
number of neurons, and the best split is found by trying every ``h``:

    for h in 0 .. #heads:
        n(h) = largest n with  cost(top h heads) + cost(top n neurons) <= budget
        score(h) = imp(top h heads) + imp(top n(h) neurons)
    keep the top h*, n(h*) with h* = argmax score   (first maximum: fewest heads on ties)

With uniform costs this is the exact optimum of the knapsack "keep any set of heads and
neurons within the budget, maximise summed importance" (for fixed counts the top-ranked
units are best), which the tests check by brute force.

Generalisation to per-layer costs (layers of different width, a cost model measured per
layer): units are ranked by importance PER UNIT COST (``imp / cost``, the greedy order of
the fractional knapsack; it is the paper's ranking when costs are uniform), costs are
prefix-summed in that order, and ``n(h)`` is the longest neuron prefix that fits. The
search space is still "a prefix of the heads and a prefix of the neurons", so the result
is optimal among those prefixes but, with non-uniform costs, only a heuristic for the full
knapsack (a leftover budget is not filled with cheaper units further down the ranking).

Layout: importances are either a dense ``(L, H)`` tensor or a ragged list of ``L`` 1-D
tensors (layers with different unit counts); masks come back in the same layout. Costs are
a scalar (uniform) or one value per layer (a tensor or sequence of length ``L``). The
budget is absolute, in the units of the costs: the caller converts a FLOPs/latency
fraction and subtracts any fixed cost (embeddings, per-layer overheads) beforehand. ``h =
0`` (no head at all) is part of the search; the paper starts at one head.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

Importance = Union[Tensor, Sequence[Tensor]]  # (L, U) tensor, or L tensors of shape (U_l,)
Mask = Union[Tensor, list]  # same layout as the importance, dtype bool
Cost = Union[float, int, Tensor, Sequence[float]]  # scalar, or one value per layer (L,)


def _flatten(imp: Importance, name: str) -> tuple[Tensor, list[int], tuple[int, ...] | None]:
    """Importances as one float64 vector, the per-layer sizes, and the dense shape (None if ragged)."""
    if isinstance(imp, Tensor):
        if imp.ndim != 2:
            raise ValueError(f"{name} must be a (layers, units) tensor or a list of 1-D tensors, got shape {tuple(imp.shape)}")
        sizes, flat, dense_shape = [imp.shape[1]] * imp.shape[0], imp.reshape(-1), tuple(imp.shape)
    elif isinstance(imp, (list, tuple)):
        if not all(isinstance(t, Tensor) and t.ndim == 1 for t in imp):
            raise ValueError(f"{name} given as a list must hold only 1-D tensors (one per layer)")
        sizes, dense_shape = [t.shape[0] for t in imp], None
        flat = torch.cat(list(imp)) if imp else torch.zeros(0)
    else:
        raise ValueError(f"{name} must be a (layers, units) tensor or a list of 1-D tensors, got {type(imp).__name__}")
    if not flat.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {flat.dtype}")
    if not torch.isfinite(flat).all() or (flat < 0).any():
        raise ValueError(f"{name} must be finite and >= 0 (a Fisher diagonal), got min {flat.min().item() if flat.numel() else None}")
    return flat.to(torch.float64), sizes, dense_shape


def _unit_costs(cost: Cost, sizes: list[int], device: torch.device, name: str) -> Tensor:
    """Per-unit cost vector (sum(sizes),) from a scalar or a per-layer cost."""
    if isinstance(cost, Tensor) and cost.ndim == 0:
        cost = cost.item()
    if isinstance(cost, (int, float)):
        per_layer = torch.full((len(sizes),), float(cost), dtype=torch.float64, device=device)
    else:
        per_layer = torch.as_tensor(cost, dtype=torch.float64).to(device).reshape(-1)
        if per_layer.shape[0] != len(sizes):
            raise ValueError(f"{name} must be a scalar or have one value per layer ({len(sizes)}), got {per_layer.shape[0]} values")
    if not torch.isfinite(per_layer).all() or (per_layer <= 0).any():
        raise ValueError(f"{name} must be finite and > 0, got {per_layer.tolist()}")
    counts = torch.tensor(sizes, dtype=torch.long, device=device)
    return per_layer.repeat_interleave(counts)  # (units,)


def _ranked_prefixes(imp: Tensor, cost: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Order by importance per cost (descending, stable) and the prefix sums in that order.

    Returns ``order`` (n,), ``cum_imp`` (n+1,), ``cum_cost`` (n+1,) with a leading 0.
    """
    order = torch.sort(imp / cost, descending=True, stable=True).indices
    zero = imp.new_zeros(1)
    cum_imp = torch.cat([zero, imp[order].cumsum(0)])
    cum_cost = torch.cat([zero, cost[order].cumsum(0)])
    return order, cum_imp, cum_cost


def _unflatten(keep: Tensor, sizes: list[int], dense_shape: tuple[int, ...] | None) -> Mask:
    if dense_shape is None:
        return list(torch.split(keep, sizes))
    return keep.reshape(dense_shape)


def search_mask(
    head_imp: Importance,
    neuron_imp: Importance,
    head_cost: Cost,
    neuron_cost: Cost,
    budget: float,
) -> tuple[Mask, Mask]:
    """Keep the heads and neurons of largest total importance whose total cost fits ``budget``.

    ``head_imp`` (L, H) / ``neuron_imp`` (L, N): Fisher importances (>= 0), dense or ragged
    lists of 1-D tensors. ``head_cost`` / ``neuron_cost``: cost of one unit, a scalar or one
    value per layer (> 0). ``budget``: absolute cost allowed for all kept units together.
    Returns boolean ``(head_mask, neuron_mask)`` (True = kept) in the layout of the
    importances; their summed cost never exceeds ``budget``. See the module docstring for
    the search and its per-layer-cost generalisation.
    """
    h_imp, h_sizes, h_shape = _flatten(head_imp, "head_imp")
    n_imp, n_sizes, n_shape = _flatten(neuron_imp, "neuron_imp")
    device = h_imp.device
    if n_imp.device != device:
        raise ValueError(f"head_imp and neuron_imp must be on one device, got {device} and {n_imp.device}")
    if isinstance(budget, Tensor):
        budget = budget.item()
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0 (absolute cost of the kept units), got {budget!r}")

    h_order, h_cum_imp, h_cum_cost = _ranked_prefixes(h_imp, _unit_costs(head_cost, h_sizes, device, "head_cost"))
    n_order, n_cum_imp, n_cum_cost = _ranked_prefixes(n_imp, _unit_costs(neuron_cost, n_sizes, device, "neuron_cost"))

    # For every head count h = 0..H_total: the longest neuron prefix that fits.
    remaining = budget - h_cum_cost  # (H_total+1,)
    n_keep = torch.searchsorted(n_cum_cost, remaining, right=True) - 1  # (H_total+1,), -1 if h heads alone overflow
    score = h_cum_imp + n_cum_imp[n_keep.clamp(min=0)]
    score = torch.where(n_keep >= 0, score, torch.full_like(score, -math.inf))
    h_best = int(torch.argmax(score))  # first maximum; h = 0 is always feasible
    n_best = int(n_keep[h_best])

    h_keep = torch.zeros(h_imp.shape[0], dtype=torch.bool, device=device)
    h_keep[h_order[:h_best]] = True
    n_keep_mask = torch.zeros(n_imp.shape[0], dtype=torch.bool, device=device)
    n_keep_mask[n_order[:n_best]] = True
    return _unflatten(h_keep, h_sizes, h_shape), _unflatten(n_keep_mask, n_sizes, n_shape)
