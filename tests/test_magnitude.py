"""Magnitude scores, the generic selectors and unstructured pruning, against references."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from tshrink.arch.families import get_adapter
from tshrink.cost import CostModel
from tshrink.selection import select_global, select_uniform
from tshrink.units import UnitScores
from tshrink_plugins.magnitude.scores import head_scores, neuron_scores, unstructured_prune


def test_head_scores_match_hand_computation_gqa():
    adapter = get_adapter(tiny_model("llama"))
    p = adapter.attn(0)
    d, g = p.head_dim, p.group
    u = 1  # second KV group: query heads 2,3 (rows 16..31), kv head 1 (rows 8..15)
    ref = torch.cat([p.q.weight[u * g * d:(u + 1) * g * d].flatten(), p.k.weight[u * d:(u + 1) * d].flatten(),
                     p.v.weight[u * d:(u + 1) * d].flatten(), p.o.weight[:, u * g * d:(u + 1) * g * d].flatten()])
    torch.testing.assert_close(head_scores(adapter, 0)[u], ref.norm())
    torch.testing.assert_close(head_scores(adapter, 0, "l1")[u], ref.abs().sum())


def test_neuron_scores_match_hand_computation():
    adapter = get_adapter(tiny_model("llama"))
    m = adapter.mlp(1)
    j = 5
    ref = torch.cat([m.inputs[0].weight[j], m.inputs[1].weight[j], m.out.weight[:, j]]).norm()
    torch.testing.assert_close(neuron_scores(adapter, 1)[j], ref)


def _scores(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    return UnitScores([torch.rand(n, generator=g) for n in adapter.head_counts()],
                      [torch.rand(n, generator=g) for n in adapter.neuron_counts()])


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.9, 1.0])
def test_selectors_meet_budget_and_fill_it(budget):
    adapter = get_adapter(tiny_model("bert"))
    cost = CostModel(adapter, 16)
    scores = _scores(adapter)
    for sel in (select_global(scores, cost, budget), select_global(scores, cost, budget, per_cost=True),
                select_uniform(scores, cost, budget)):
        frac = cost.fraction(sel)
        assert frac <= budget + 1e-9
        assert frac >= budget - 0.2  # never wastes most of the budget
    full = select_global(scores, cost, 1.0)
    assert full.widths() == adapter.widths()


def test_global_selection_is_greedy_fill():
    """Invariant of greedy filling: a unit dropped while a lower-ranked one was kept must
    cost more than that one (it was skipped because it no longer fit)."""
    adapter = get_adapter(tiny_model("bert"))
    cost = CostModel(adapter, 16)
    scores = _scores(adapter, seed=1)
    sel = select_global(scores, cost, 0.5, normalize="none")
    units = []  # (score, cost, kept)
    for l, c in enumerate(cost.layers):
        units += [(scores.heads[l][i].item(), c.head, i in sel.heads[l]) for i in range(len(scores.heads[l]))]
        units += [(scores.neurons[l][i].item(), c.neuron, i in sel.neurons[l]) for i in range(len(scores.neurons[l]))]
    kept = [u for u in units if u[2]]
    dropped = [u for u in units if not u[2]]
    assert kept and dropped
    for ds, dc, _ in dropped:
        for ks, kc, _ in kept:
            if ds > ks:
                assert dc > kc


def test_uniform_keeps_same_fraction_per_layer():
    adapter = get_adapter(tiny_model("bert"))
    sel = select_uniform(_scores(adapter), CostModel(adapter, 16), 0.5)
    assert len(set(sel.widths()["neurons"])) == 1 and len(set(sel.widths()["heads"])) == 1


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8])
def test_unstructured_reaches_exact_sparsity(sparsity):
    adapter = get_adapter(tiny_model("bert"))
    from tshrink_plugins.magnitude.scores import prunable_linears

    rep = unstructured_prune(adapter, sparsity)
    zeros = sum(int((lin.weight == 0).sum()) for _, lin in prunable_linears(adapter))
    assert zeros == rep["zeros"] == round(sparsity * rep["weights"])  # exact count, rounded to whole weights
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_prune(adapter, 1.0)
