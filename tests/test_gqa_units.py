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


# -- producers: STAT with query-head units (pure math first, then the plugin, then the CLI) ------
def _acts(seed: int = 0, tokens: int = 200, units: int = 3, group: int = 3, d: int = 4, out: int = 10):
    g = torch.Generator().manual_seed(seed)
    n = units * group * d
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return X, torch.randn(out, n, generator=g, dtype=torch.float64)


def _lstsq_error(X, W, cols):
    """Hand computation: || X W^T - X_K B ||^2 with B the least-squares fit."""
    target = X @ W.T
    B = torch.linalg.lstsq(X[:, cols], target).solution
    return float((target - X[:, cols] @ B).pow(2).sum())


def test_stat_query_options_are_exact_least_squares_fold_errors():
    from plugins.stat.query_units import attention_options, fold_error

    X, W = _acts()
    G = X.T @ X
    cols = torch.tensor([0, 1, 2, 3, 12, 13, 14, 15])
    assert fold_error(G, W, cols) == pytest.approx(_lstsq_error(X, W, cols), rel=1e-6)
    for mode in ("group", "query", "both"):
        opts = attention_options(G, W, 3, 3, 4, mode)
        for o in opts:
            assert len(o.heads) == o.units * o.group and len(set(h // 3 for h in o.heads)) == o.units
            for u in o.kept_units(3):  # every kept group keeps the same number of query heads
                assert sum(h // 3 == u for h in o.heads) == o.group
            want = float((X @ W.T).pow(2).sum()) if not o.heads else \
                _lstsq_error(X, W, torch.cat([torch.arange(h * 4, h * 4 + 4) for h in o.heads]))
            assert o.error == pytest.approx(want, rel=1e-6, abs=1e-6 * float((X @ W.T).pow(2).sum()))
        shapes = {(o.units, o.group) for o in opts}
        assert shapes == {"group": {(0, 0), (1, 3), (2, 3), (3, 3)}, "query": {(3, 1), (3, 2), (3, 3)},
                          "both": {(0, 0)} | {(u, g) for u in (1, 2, 3) for g in (1, 2, 3)}}[mode]
    # multi-head attention has no finer unit: the group options
    assert {(o.units, o.group) for o in attention_options(G, W, 9, 1, 4, "both")} == {(u, 1 if u else 0)
                                                                                       for u in range(10)}


def test_allocate_options_equals_the_global_allocation_on_equal_unit_costs():
    from plugins.stat.allocate import allocate_global, allocate_options

    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        curves, macs = [], []
        for _ in range(5):
            n = int(torch.randint(1, 12, (1,), generator=g))
            drops = torch.rand(n, generator=g, dtype=torch.float64)
            curves.append(torch.cat([drops.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)]))
            macs.append(int(torch.randint(1, 9, (1,), generator=g)))
        allowed = float(torch.rand(1, generator=g)) * sum((c.numel() - 1) * m for c, m in zip(curves, macs))
        menus = [[(k * m, float(c[k])) for k in range(c.numel())] for c, m in zip(curves, macs)]
        assert allocate_options(menus, allowed) == allocate_global(curves, macs, allowed), trial


def test_allocate_options_unequal_costs_by_hand():
    from plugins.stat.allocate import allocate_options

    # attention menu: none (0, 10), (cost 4, err 3), (cost 6, err 2.5), full (10, 0); neurons: 2 per MAC step
    att = [(0, 10.0), (4, 3.0), (6, 2.5), (10, 0.0)]
    mlp = [(0, 6.0), (3, 2.0), (6, 0.0)]
    assert allocate_options([att, mlp], 10) == [1, 2]  # 4 + 6 MACs: error 3; not (10, 0) + nothing: error 6
    assert allocate_options([att, mlp], 16) == [3, 2]
    chosen = allocate_options([att, mlp], 7)
    assert att[chosen[0]][0] + mlp[chosen[1]][0] <= 7 and chosen == [1, 1]  # error 5
    with pytest.raises(ValueError, match="cheapest"):
        allocate_options([[(5, 0.0)]], 4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("mode", ["query", "both"])
def test_stat_with_query_head_units_prunes_within_the_budget(family, mode):
    from tshrink.pipeline import prune

    model = tiny_model(family, head="causal-lm")
    groups = get_adapter(model).group_sizes()
    calib = tiny_batches(family, n_batches=4, seq=16)
    res = prune(model, "stat", 0.6, calib=calib, options={"stat_attention_units": mode})
    adapter = get_adapter(res.model)
    assert res.report["flops_kept"] <= 0.6 + 1e-9
    assert res.report["options"]["stat_attention_units"] == mode
    widths = adapter.widths()
    if mode == "query":  # every group kept, some query heads removed
        assert widths["heads"] == res.report["widths_before"]["heads"]
    if mode == "query" or family == "gemma3":  # "both" may prefer whole groups; with one KV head it cannot
        assert "group" in widths and any(g < d for g, d in zip(widths["group"], groups))
    assert widths == res.selection.widths(groups)
    assert res.report["stages"]["stat:select"]["attention_units"] == mode
    # the finer options include the group options: the estimated error is not above group units'
    group = prune(tiny_model(family, head="causal-lm"), "stat", 0.6, calib=calib)
    assert res.report["stages"]["stat:select"]["estimated_error"] <= \
        group.report["stages"]["stat:select"]["estimated_error"] * (1 + 1e-9) or mode == "query"


def test_stat_query_units_need_matching_scores_and_global_allocation():
    from tshrink.errors import StageError
    from tshrink.pipeline import prune

    calib = tiny_batches("llama", n_batches=2, seq=16)
    with pytest.raises(StageError, match="needs stat_allocation='global'"):
        prune(tiny_model("llama", head="causal-lm"), "stat", 0.6, calib=calib,
              options={"stat_attention_units": "both", "stat_allocation": "uniform"})
    with pytest.raises(ValueError, match="not one of"):
        prune(tiny_model("llama", head="causal-lm"), "stat", 0.6, calib=calib,
              options={"stat_attention_units": "heads"})


def test_harness_prune_stat_with_query_units_from_the_cli(tmp_path):
    import json

    from _tokenizers import byte_bpe_tokenizer
    from tshrink_harness.cli import main

    text = "some calibration text for a tiny model " * 20
    tokenizer = byte_bpe_tokenizer([text])
    tiny_model("gemma3", head="causal-lm", vocab_size=max(97, len(tokenizer))).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "pruned"
    rc = main(["prune", "--method", "stat", "--model", str(tmp_path / "tiny"), "--flops", "0.6", "--output", str(out),
               "--calib-samples", "4", "--seq-len", "16", "--opt", "stat_attention_units=query"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["stat_attention_units"] == "query" and "group" in report["widths_after"]
    again = load_pruned(out)
    assert get_adapter(again).widths() == report["widths_after"]


def test_plugins_lists_the_option_and_the_architectures_and_readme_matches_the_catalog(capsys):
    import re
    from pathlib import Path

    from tshrink.arch.catalog import FAMILIES, UNSUPPORTED
    from tshrink_harness.cli import main

    assert main(["plugins", "--options"]) == 0
    out = capsys.readouterr().out
    assert "--opt stat_attention_units='group'" in out and "Supported architectures" in out
    for types, _ in FAMILIES.values():
        assert all(t in out for t in types)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z0-9_\-]+)`", section))
    catalog = {t for types, _ in FAMILIES.values() for t in types} | set(UNSUPPORTED)
    assert catalog <= named, f"README's supported-architecture section misses {sorted(catalog - named)}"


def test_select_query_units_by_hand():
    """One layer, 2 groups of 2 query heads; costs kv=1, query head=2, neuron=1 (no fixed)."""
    from types import SimpleNamespace

    from tshrink.cost import LayerCost
    from tshrink.selection import select_query_units
    from tshrink.units import UnitScores

    layer = LayerCost(head=5, neuron=1, fixed=0, kv=1, query_head=2)
    cost = SimpleNamespace(layers=[layer], groups=[2], budget_macs=lambda b: b * 12)  # dense: 2*5 + 2 neurons
    scores = UnitScores([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 1.0])])
    q = [torch.tensor([3.0, 0.1, 2.0, 0.2])]  # head 0 of group 0 and head 0 of group 1 matter
    sel = select_query_units(scores, q, cost, 8 / 12, "query", normalize="none")
    assert sel.heads == [[0, 1]] and sel.query_heads == [[0, 2]] and sel.neurons == [[0, 1]]  # 2*(1+2) + 2 = 8
    sel = select_query_units(scores, q, cost, 5 / 12, "both", normalize="none")
    assert sel.heads == [[0]] and sel.query_heads == [[0]] and len(sel.neurons[0]) == 2  # 1 + 2 + 2 = 5


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("mode", ["query", "both"])
def test_magnitude_with_query_head_units(family, mode):
    from tshrink.pipeline import prune

    model = tiny_model(family, head="causal-lm")
    groups = get_adapter(model).group_sizes()
    res = prune(model, "magnitude", 0.6, options={"magnitude_attention_units": mode})
    widths = get_adapter(res.model).widths()
    assert res.report["flops_kept"] <= 0.6 + 1e-9 and widths == res.selection.widths(groups)
    assert "group" in widths and any(g < d for g, d in zip(widths["group"], groups))
    if mode == "query":
        assert widths["heads"] == res.report["widths_before"]["heads"]


def test_harness_prune_magnitude_with_query_units_from_the_cli(tmp_path):
    import json

    from _tokenizers import byte_bpe_tokenizer
    from tshrink_harness.cli import main

    tokenizer = byte_bpe_tokenizer(["some calibration text for a tiny model " * 20])
    tiny_model("llama", head="causal-lm", vocab_size=max(97, len(tokenizer))).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rc = main(["prune", "--method", "magnitude", "--model", str(tmp_path / "tiny"), "--flops", "0.6",
               "--output", str(tmp_path / "p"), "--calib-samples", "4", "--seq-len", "16",
               "--opt", "magnitude_attention_units=both"])
    assert rc == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["options"]["magnitude_attention_units"] == "both"
    assert get_adapter(load_pruned(tmp_path / "p")).widths() == report["widths_after"]


FISHER_SEARCH = "score=fisher,select=fisher-search"


def test_fisher_query_head_masks_give_query_head_importances():
    """The query-head masks' gradients: each head's importance is the sum over batches of its
    squared gradient, and a group's mask gradient is the sum of its query heads' (both masks at 1)."""
    from plugins.fisher.collect import collect_mask_grads

    adapter = get_adapter(tiny_model("llama", head="causal-lm"))
    calib = tiny_batches("llama", n_batches=3, seq=16, labels="lm")
    query: list[torch.Tensor] = []
    heads, _ = collect_mask_grads(adapter, calib, query_out=query)
    for layer, (h, q) in enumerate(zip(heads, query)):
        g = adapter.attn(layer).group
        assert q.shape == (h.shape[0], h.shape[1] * g)
        torch.testing.assert_close(q.reshape(q.shape[0], -1, g).sum(-1), h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("mode", ["query", "both"])
def test_fisher_search_with_query_head_units(family, mode):
    from tshrink.pipeline import prune

    model = tiny_model(family, head="causal-lm")
    groups = get_adapter(model).group_sizes()
    calib = tiny_batches(family, n_batches=4, seq=16, labels="lm")
    res = prune(model, FISHER_SEARCH + ",correct=stat", 0.6, calib=calib, options={"fisher_attention_units": mode})
    widths = get_adapter(res.model).widths()
    assert res.report["flops_kept"] <= 0.6 + 1e-9 and widths == res.selection.widths(groups)
    assert len(res.scores.extra["query_heads"]) == len(groups)
    if mode == "query":
        assert widths["heads"] == res.report["widths_before"]["heads"]
    if family == "gemma3":  # one KV head: group units drop attention whole, query units thin it
        assert "group" in widths and all(h == 1 for h in widths["heads"])


def test_fisher_rearrange_and_tune_refuse_query_head_units():
    from tshrink.errors import StageError
    from tshrink.pipeline import prune

    calib = tiny_batches("gemma3", n_batches=2, seq=16, labels="lm")
    with pytest.raises(StageError, match="fisher-rearrange' does not handle query-head units"):
        prune(tiny_model("gemma3", head="causal-lm"), "fisher", 0.6, calib=calib,
              options={"fisher_attention_units": "query"})


def test_harness_prune_fisher_with_query_units_from_the_cli(tmp_path):
    import json

    from _tokenizers import byte_bpe_tokenizer
    from tshrink_harness.cli import main

    tokenizer = byte_bpe_tokenizer(["some calibration text for a tiny model " * 20])
    tiny_model("gemma3", head="causal-lm", vocab_size=max(97, len(tokenizer))).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rc = main(["prune", "--method", FISHER_SEARCH, "--model", str(tmp_path / "tiny"), "--flops", "0.6",
               "--output", str(tmp_path / "p"), "--calib-samples", "4", "--seq-len", "16",
               "--opt", "fisher_attention_units=query"])
    assert rc == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["options"]["fisher_attention_units"] == "query" and "group" in report["widths_after"]
    assert get_adapter(load_pruned(tmp_path / "p")).widths() == report["widths_after"]
