"""FLAP's formulas (An et al., Fluctuation-based Adaptive Structured Pruning for Large
Language Models, AAAI 2024), pure math over statistics and weights (no pluggy).

Fluctuation metric (WIFV, the paper's default): for input channel ``j`` of an output
projection ``W`` (out, in), ``s_j = var_j * ||W[:, j]||^2``, with ``var_j`` the variance of
channel ``j`` over the calibration tokens. As in the reference code, the attention channels'
metric is squared before use, and a head (here: a KV group with its query heads) scores the
mean of its channels' metrics.

Adaptive structure search (AL-AM): the channel metrics are standardised per layer and module
(``(s - mean) / std`` over the module's channels in that layer, unbiased std), a unit takes
the mean of its standardised channels, and one descending ranking over all heads and neurons
of the model is cut where the kept units' cost reaches the budget (the reference code weighs
a head as 512/3 neurons, its parameter ratio on LLaMA-7B; here each unit costs its MACs
under the cost model, so the budget is a FLOPs fraction).

Bias compensation: removing input channels ``R`` of ``W`` is compensated by adding
``W[:, R] @ mean[R]`` to the projection's bias (the removed channels' mean contribution).
"""
from __future__ import annotations

import torch
from torch import Tensor

from tshrink.cost import CostModel
from tshrink.units import Selection


def wifv(var: Tensor, weight: Tensor) -> Tensor:
    """(in,) fluctuation metric: channel variance x squared column norm of ``weight`` (out, in)."""
    if var.shape != (weight.shape[1],):
        raise ValueError(f"variance of shape {tuple(var.shape)} for a weight with {weight.shape[1]} input columns")
    return var.double() * weight.detach().double().pow(2).sum(0)


def standardize(x: Tensor) -> Tensor:
    """``(x - mean) / std`` (unbiased std) over all of ``x``; zeros when it has no spread."""
    if x.numel() < 2:
        return torch.zeros_like(x, dtype=torch.float64)
    x = x.double()
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def unit_means(channels: Tensor, width: int) -> Tensor:
    """(units,) mean of each consecutive block of ``width`` channels."""
    if channels.numel() % max(width, 1):
        raise ValueError(f"{channels.numel()} channels do not split into units of {width}")
    return channels.reshape(-1, width).mean(1) if channels.numel() else channels.new_zeros(0)


def adaptive_search(heads: list[Tensor], neurons: list[Tensor], cost: CostModel, budget: float) -> Selection:
    """One descending ranking of every unit's (standardised) score; keep the longest prefix
    whose MACs fit the budget (FLAP's global threshold). Ties keep layer / kind / index order."""
    allowed = cost.budget_macs(budget) - sum(c.fixed for c in cost.layers)
    score, unit_cost, owner = [], [], []
    for layer, (h, n) in enumerate(zip(heads, neurons)):
        c = cost.layers[layer]
        for kind, s, per in ((0, h, c.head), (1, n, c.neuron)):
            score.append(s.double())
            unit_cost.append(torch.full((s.numel(),), float(per), dtype=torch.float64))
            owner += [(layer, kind, i) for i in range(s.numel())]
    sel = Selection([[] for _ in heads], [[] for _ in neurons])
    if not owner:
        return sel
    order = torch.sort(-torch.cat(score), stable=True).indices
    spent = torch.cumsum(torch.cat(unit_cost)[order], 0)
    keep = int((spent <= allowed + 1e-6).sum())  # cumsum is increasing: a prefix
    for i in order[:keep].tolist():
        layer, kind, idx = owner[i]
        (sel.heads if kind == 0 else sel.neurons)[layer].append(idx)
    return Selection(sel.heads, sel.neurons)


def compensation_bias(weight: Tensor, mean: Tensor, removed: Tensor) -> Tensor:
    """(out,) bias that replaces the removed input channels by their mean: ``W[:, R] @ mean[R]``."""
    removed = removed.to(torch.long)
    if removed.numel() == 0:
        return torch.zeros(weight.shape[0], dtype=torch.float64)
    return weight.detach().double()[:, removed] @ mean.double()[removed]
