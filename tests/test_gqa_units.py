"""Query-head units under grouped-query attention: a layer keeps g' of the g query heads of
every kept KV group (the same g' within the layer), alone or with whole groups removed."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches, tiny_model
from plugins.magnitude.scores import query_head_scores
from tshrink.arch.families import get_adapter
from tshrink.checkpoint import load_pruned, save_pruned
from tshrink.cost import CostModel
from tshrink.flops import measure_flops
from tshrink.masking import soft_masks
from tshrink.selection import keep_query_heads
from tshrink.surgery import apply_selection, prune_query_heads
from tshrink.units import Selection

GQA = ("llama", "qwen3", "gemma2", "gemma3", "phi3", "granite")  # gemma3: one KV head (multi-query)


def _selection(adapter, seed: int = 0) -> Selection:
    """Random kept groups (layer 1 keeps one) and a random g' per layer, random heads per group."""
    g = torch.Generator().manual_seed(seed)
    heads, neurons, query = [], [], []
    for layer, (u, n, grp) in enumerate(zip(adapter.head_counts(), adapter.neuron_counts(), adapter.group_sizes())):
        ku = 1 if layer == 1 else int(torch.randint(1, u + 1, (1,), generator=g))
        kept = sorted(torch.randperm(u, generator=g)[:ku].tolist())
        k = int(torch.randint(1, grp, (1,), generator=g)) if layer != 2 else grp  # layer 2: all query heads
        heads.append(kept)
        neurons.append(torch.randperm(n, generator=g)[: int(torch.randint(1, n, (1,), generator=g))].tolist())
        query.append(sorted(uu * grp + int(j) for uu in kept for j in torch.randperm(grp, generator=g)[:k]))
    return Selection(heads, neurons, query)


def _out(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]


@pytest.mark.parametrize("family", GQA)
def test_masked_equals_pruned_and_cost_matches_fvcore(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    batch = tiny_batches(family).batches[0]
    groups = adapter.group_sizes()
    assert all(g > 1 for g in groups)
    sel = _selection(adapter)
    hm, nm = sel.masks(adapter.head_counts(), adapter.neuron_counts())
    qm = sel.query_head_masks(adapter.head_counts(), groups)
    with soft_masks(adapter, hm, nm, qm):
        masked = _out(model, batch)
    cost = CostModel(adapter, 16)
    apply_selection(adapter, sel)
    torch.testing.assert_close(_out(model, batch), masked, rtol=1e-5, atol=1e-5)
    widths = adapter.widths()
    assert widths == sel.widths(groups)
    assert widths["group"][2] == groups[2] and widths["group"][0] < groups[0]
    pruned_flops = measure_flops(model, 16)["total"]
    assert abs(cost.backbone_macs(widths) - pruned_flops) <= 0.01 * pruned_flops
    assert cost.macs(sel) == cost.macs(widths)


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_save_reload_records_the_group_sizes(family, tmp_path):
    model = tiny_model(family, head="causal-lm")
    adapter = get_adapter(model)
    apply_selection(adapter, _selection(adapter, seed=1))
    batch = tiny_batches(family).batches[0]
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert get_adapter(again).widths() == adapter.widths()
    torch.testing.assert_close(_out(again, batch), _out(model, batch), rtol=0, atol=0)


def test_magnitude_query_heads_keep_the_largest_in_every_group():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    groups = adapter.group_sizes()
    scores = [query_head_scores(adapter, layer) for layer in range(adapter.num_layers)]
    full = Selection.full(adapter.head_counts(), adapter.neuron_counts())
    sel = keep_query_heads(full, scores, groups, [1] * adapter.num_layers)
    for layer, q in enumerate(sel.query_heads):
        best = scores[layer].reshape(-1, groups[layer]).argmax(1)
        assert q == [u * groups[layer] + int(j) for u, j in enumerate(best)]
    apply_selection(adapter, sel)
    assert adapter.group_sizes() == [1] * adapter.num_layers
    with pytest.raises(ValueError, match="expected 1..1"):
        keep_query_heads(Selection.full(adapter.head_counts(), adapter.neuron_counts()),
                         [query_head_scores(adapter, layer) for layer in range(adapter.num_layers)],
                         adapter.group_sizes(), [2] * adapter.num_layers)


def test_uneven_groups_and_multi_head_attention_are_refused():
    adapter = get_adapter(tiny_model("llama"))  # 2 groups of 2 query heads
    with pytest.raises(ValueError, match="same number"):
        prune_query_heads(adapter, 0, [0, 1, 2])
    with pytest.raises(ValueError, match="not kept"):
        apply_selection(adapter, Selection([[0]] * 3, [list(range(48))] * 3, [[0, 2]] * 3))
    mha = get_adapter(tiny_model("bert"))
    with pytest.raises(ValueError, match="grouped-query attention"):
        prune_query_heads(mha, 0, [0, 1])
