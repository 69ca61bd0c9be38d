"""LLM-Pruner's importance (Ma et al., LLM-Pruner: On the Structural Pruning of Large
Language Models, NeurIPS 2023), pure math over weights and gradients (no pluggy).

Element-wise Taylor importance of a weight ``w`` with loss gradient ``g`` and accumulated
squared gradient ``a`` (the Fisher approximation of the Hessian diagonal):

- ``param_first``: ``w * g`` (first-order term);
- ``param_second``: ``w * a * w``;
- ``param_mix`` (the reference code's default): ``w * g - 0.5 * w * a * w``.

A group's importance is the sum of ``|importance|`` over all its weights (the code's
``grouping_strategy=sum``): for an attention unit (here: a KV group with its query heads)
its rows of Q, K, V and its columns of O; for an MLP neuron its gate and up rows and its down
column. Biases and norms are not in the groups of the block-wise (Llama) setting.
"""
from __future__ import annotations

import torch
from torch import Tensor

TAYLOR = ("param_first", "param_second", "param_mix")


def salience(weight: Tensor, grad: Tensor, acc: Tensor, taylor: str = "param_mix") -> Tensor:
    """Element-wise Taylor importance (same shape as ``weight``), before the absolute value."""
    if taylor not in TAYLOR:
        raise ValueError(f"taylor={taylor!r} is not one of {TAYLOR}")
    w, g, a = weight.detach().double(), grad.double(), acc.double()
    if taylor == "param_first":
        return w * g
    if taylor == "param_second":
        return w * a * w
    return w * g - 0.5 * w * a * w


def head_importance(sq: Tensor, sk: Tensor, sv: Tensor, so: Tensor, head_dim: int, group: int) -> Tensor:
    """(units,) from saliences of Q (units*g*d, hidden), K, V (units*d, hidden), O (hidden, units*g*d)."""
    units = so.shape[1] // (head_dim * group)
    return (sq.abs().reshape(units, -1).sum(1) + sk.abs().reshape(units, -1).sum(1)
            + sv.abs().reshape(units, -1).sum(1) + so.abs().t().reshape(units, -1).sum(1))


def neuron_importance(inputs: list[Tensor], out: Tensor) -> Tensor:
    """(neurons,) from saliences of the gate/up rows (neurons, hidden) and the down columns (hidden, neurons)."""
    return sum(s.abs().sum(1) for s in inputs) + out.abs().sum(0)


def block_selection_fraction(n_heads: list[int], n_neurons: list[int], pruned: list[bool], cost: "object",
                             budget: float) -> float:
    """The largest kept fraction ``f`` (same for heads and neurons of every pruned layer, the other
    layers kept whole) whose MACs fit the budget; ValueError when even ``f = 0`` does not fit."""
    allowed = cost.budget_macs(budget)

    def macs(frac: float) -> float:
        widths = {"heads": [round(frac * h) if p else h for h, p in zip(n_heads, pruned)],
                  "neurons": [round(frac * n) if p else n for n, p in zip(n_neurons, pruned)]}
        return cost.macs(widths)

    if macs(0.0) > allowed:
        raise ValueError(f"budget {budget:g} cannot be met with the layers LLM-Pruner leaves whole (pruning every "
                         f"other layer completely still keeps {macs(0.0) / cost.macs():.3f} of the FLOPs); "
                         "lower llm_pruner_skip_first / llm_pruner_skip_last")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) <= allowed else (lo, mid)
    return lo


def top_k(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores (ties: lower index first)."""
    return sorted(torch.sort(-scores.double(), stable=True).indices[:k].tolist())
