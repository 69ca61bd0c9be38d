"""Fisher as its authors ran it: gradient granularity, teacher, [CLS]-only tuning, held-out
Fisher loss, and the record of deviations from the public code (tiny models)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.calibration import CalibrationData, model_inputs
from tshrink.masking import soft_masks
from tshrink.pipeline import prune
from tshrink.units import Selection
from tshrink_plugins.fisher import published
from tshrink_plugins.fisher.collect import collect_mask_grads, regroup
from tshrink_plugins.fisher.plugin import grad_batch_size
from tshrink_plugins.fisher.rearrange import heldout_loss
from tshrink_plugins.fisher.tune_model import tune_masks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bert(seed: int = 0, n_batches: int = 2):
    return tiny_model("bert", "sequence-classification", seed=seed), tiny_batches("bert", n_batches=n_batches,
                                                                                  labels="class", seed=seed)


def test_regroup_merges_and_splits_examples_in_order_with_padding():
    a = {"input_ids": torch.arange(6).reshape(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long),
         "labels": torch.tensor([0, 1])}
    b = {"input_ids": torch.arange(10, 25).reshape(3, 5), "attention_mask": torch.ones(3, 5, dtype=torch.long),
         "labels": torch.tensor([1, 0, 1])}
    out = list(regroup([a, b], 4))
    assert [int(x["input_ids"].shape[0]) for x in out] == [4, 1]
    first = out[0]
    assert first["input_ids"].shape == (4, 5) and first["labels"].tolist() == [0, 1, 1, 0]
    assert first["attention_mask"][:2, 3:].sum() == 0 and first["attention_mask"][2:].all()  # padding masked
    assert torch.equal(first["input_ids"][:2, :3], a["input_ids"]) and torch.equal(out[1]["input_ids"], b["input_ids"][2:])
    lm = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
          "labels": torch.ones(1, 2, dtype=torch.long)}
    lm3 = {k: torch.ones(1, 3, dtype=torch.long) for k in lm}
    merged = next(regroup([lm, lm3], 2))
    assert merged["labels"][0].tolist() == [1, 1, -100]  # per-token labels are padded with the ignore index
    assert list(regroup([a, b], 0)) == [a, b]


def test_regrouped_gradients_equal_the_gradient_of_the_merged_batch():
    model, calib = _bert()
    adapter = get_adapter(model)
    heads, _ = collect_mask_grads(adapter, calib, grad_batch_size=6)  # 2 batches of 3 -> one row
    assert heads[0].shape[0] == 1
    merged = next(regroup(calib.batches, 6))
    masks = [torch.ones(n, requires_grad=True) for n in adapter.head_counts()]
    with soft_masks(adapter, masks, None):
        loss = model(**model_inputs(merged, labels=True)).loss
    ref = torch.autograd.grad(loss, masks)
    for got, want in zip(heads, ref):
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-8)


def test_auto_gradient_batches_are_the_public_codes_and_per_window_for_decoders():
    assert grad_batch_size("auto", "classification") == 32 and grad_batch_size("auto", "qa") == 12
    assert grad_batch_size("auto", "causal") == 1 and grad_batch_size("4", "causal") == 4
    for bad in ("x", -1, "-2", 1.5):
        with pytest.raises(ValueError, match="fisher_grad_batch_size"):
            grad_batch_size(bad, "classification")
    model = tiny_model("llama", "causal-lm")
    calib = tiny_batches("llama", n_batches=2, labels="lm")  # 6 windows in batches of 3
    rep = prune(model, "fisher-search", 0.5, calib=calib).report["stages"]
    assert rep["fisher"]["grad_batch_size"] == 1 and rep["fisher"]["grad_batches"] == 6  # 6 rows, not 2
    assert rep["fidelity"]["as_published"] is None and "decoder" in rep["fidelity"]["note"]


def _stats_key(s):
    return (s["layer"], s["kind"])


def test_cls_only_changes_only_the_last_layers_mlp_objective():
    model, calib = _bert(n_batches=3)
    adapter = get_adapter(model)
    counts = (adapter.head_counts(), adapter.neuron_counts())
    sel = Selection([[0, 2, 3]] * 3, [list(range(0, 48, 2))] * 3)
    sel.check(*counts)
    every = {_stats_key(s): s for s in tune_masks(adapter, calib, sel).stats}
    first = {_stats_key(s): s for s in tune_masks(adapter, calib, sel, cls_only=True).stats}
    last = (adapter.num_layers - 1, "mlp")
    assert set(every) == set(first) and last in every
    for key in every:
        if key == last:
            assert first[key]["tokens"] == "first" and every[key]["tokens"] == "all"
            assert first[key]["rel_error_before"] != pytest.approx(every[key]["rel_error_before"])
        else:
            for field in ("rel_error_before", "rel_error_after", "scale_min", "scale_max"):
                assert first[key][field] == every[key][field], (key, field)
    llama = get_adapter(tiny_model("llama", "causal-lm"))
    with pytest.raises(ValueError, match="cls_only"):
        tune_masks(llama, tiny_batches("llama", labels="lm"), Selection.full(llama.head_counts(),
                   llama.neuron_counts()), cls_only=True)


def test_cls_only_matches_a_first_token_reference_on_the_last_layer():
    """Last MLP with cls_only: its relative error before tuning is the first token's error alone."""
    model, calib = _bert(n_batches=1)
    adapter = get_adapter(model)
    last = adapter.num_layers - 1
    sel = Selection([[0, 1, 2, 3]] * 3, [list(range(48))] * 2 + [list(range(24))])
    grab = {}
    mlp = adapter.mlp(last)
    h = mlp.out.register_forward_hook(lambda m, a, o: grab.__setitem__("down", o.detach()))
    masks = sel.masks(adapter.head_counts(), adapter.neuron_counts())
    with torch.no_grad():
        model(**model_inputs(calib.batches[0]))
        dense_down = grab["down"][:, 0]  # (batch, hidden) first token
        with soft_masks(adapter, *masks):
            model(**model_inputs(calib.batches[0]))
        pruned_down = grab["down"][:, 0]
    h.remove()
    # earlier layers and the last attention are unpruned (their scales stay 1), so the MLP input is the
    # teacher's: r = dense - pruned Down output, t = dense Down output - bias, over the first tokens only
    bias = mlp.out.bias.detach()
    want = float((dense_down - pruned_down).double().pow(2).sum() / (dense_down - bias).double().pow(2).sum())
    stats = {_stats_key(s): s for s in tune_masks(adapter, calib, sel, cls_only=True).stats}
    s = stats[(last, "mlp")]
    assert s["tokens"] == "first" and s["rel_error_before"] == pytest.approx(want, rel=1e-3)


def test_teacher_full_selection_equals_dense_and_a_pruned_teacher_changes_targets():
    model, calib = _bert()
    adapter = get_adapter(model)
    counts = (adapter.head_counts(), adapter.neuron_counts())
    sel = Selection([[1, 3]] * 3, [list(range(20))] * 3)
    dense = tune_masks(adapter, calib, sel)
    full = tune_masks(adapter, calib, sel, teacher=Selection.full(*counts))
    for a, b in zip(dense.heads + dense.neurons, full.heads + full.neurons):
        torch.testing.assert_close(a, b)
    mid = tune_masks(adapter, calib, sel, teacher=Selection([[1, 2, 3]] * 3, [list(range(36))] * 3))
    assert any(not torch.allclose(a, b) for a, b in zip(dense.heads + dense.neurons, mid.heads + mid.neurons))


def test_fisher_default_teacher_is_the_search_at_sqrt_budget_and_dense_is_offered():
    model, calib = _bert()
    rep = prune(model, "fisher", 0.36, calib=calib).report["stages"]
    tune = rep["fisher-tune"]
    assert tune["teacher"] == "search-sqrt" and tune["cls_only"] is True
    model, calib = _bert()
    at_sqrt = prune(model, "fisher-search", math.sqrt(0.36), calib=calib).report["widths_after"]
    assert tune["teacher_widths"] == at_sqrt
    model, calib = _bert()
    rep = prune(model, "fisher", 0.36, calib=calib,
                options={"fisher_tune_teacher": "dense", "fisher_tune_cls_only": "no"}).report["stages"]
    assert rep["fisher-tune"]["teacher"] == "dense" and rep["fisher-tune"]["teacher_widths"] is None
    devs = rep["fidelity"]["deviations"]
    assert any("teacher dense" in d for d in devs) and any("every token" in d for d in devs)
    model, calib = _bert()
    with pytest.raises(ValueError, match="fisher_tune_teacher"):
        prune(model, "fisher", 0.5, calib=calib, options={"fisher_tune_teacher": "student"})
    with pytest.raises(ValueError, match="fisher_tune_teacher='search-sqrt' needs"):
        prune(model, "score=magnitude,select=global,correct=fisher-tune", 0.5, calib=calib)


def test_fidelity_says_as_published_or_names_each_deviation():
    used = {"calibration_examples": 2048, "sampling": "with replacement", "grad_batch_size": 32,
            "teacher": "search-sqrt", "cls_only": True, "pricing_len": 53, "avg_len": 53.24}
    assert published.deviations("classification", used) == []
    report = {}
    assert published.record(report, "classification", used)["as_published"] is True
    worse = dict(used, calibration_examples=256, sampling="without replacement", grad_batch_size=8,
                 pricing_len=128)
    devs = published.deviations("classification", worse)
    assert len(devs) == 4 and any("256 calibration examples" in d for d in devs)
    assert any("priced at 128 tokens" in d and "53" in d for d in devs)
    assert published.deviations("qa", dict(used, grad_batch_size=12, cls_only=False, pricing_len=170)) == []
    assert published.deviations("causal", worse) == [] and published.published_for("causal") is None
    # on a tiny run the defaults deviate (6 examples, not 2048) and the record says so
    model, calib = _bert()
    fid = prune(model, "fisher", 0.5, calib=calib).report["stages"]["fidelity"]
    assert fid["as_published"] is False and any("6 calibration examples" in d for d in fid["deviations"])
    assert fid["settings"]["grad_batch_size"] == 32 and fid["settings"]["teacher"] == "search-sqrt"
    model, calib = _bert()
    fid = prune(model, "fisher", 0.5, calib=calib, options={"fisher_grad_batch_size": 0}).report["stages"]["fidelity"]
    assert any("batches of 3 (published 32)" in d for d in fid["deviations"])  # the batches as given: 3 rows each


def test_heldout_loss_equals_in_sample_on_duplicated_rows_and_needs_two_rows():
    g = torch.randn(3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    twice = g.repeat_interleave(2, dim=0)  # rows 2i and 2i+1 equal: both folds see the same data
    inside, held = heldout_loss(twice, 4)
    assert held == pytest.approx(inside) and inside > 0
    assert heldout_loss(g[:1], 4) is None
    noisy = torch.randn(4, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inside, held = heldout_loss(noisy, 10)
    assert held > inside  # four rows: the rearrangement fits noise that does not carry over


def test_rearrange_reports_the_held_out_fisher_loss():
    model, calib = _bert()
    rep = prune(model, "fisher-rearrange", 0.5, calib=calib, options={"fisher_grad_batch_size": 1}).report
    r = rep["stages"]["fisher-rearrange"]
    assert r["gradient_rows"] == 6
    assert r["fisher_loss_per_row_held_out"] is not None and r["fisher_loss_per_row_in_sample"] is not None


def test_fidelity_is_complete_when_the_scores_are_reused():
    """harness compare scores once and reuses the scores for other budgets: the calibration
    settings must still reach the record of every budget."""
    model, calib = _bert()
    first = prune(model, "fisher", 0.5, calib=calib)
    model, calib = _bert()
    again = prune(model, "fisher", 0.4, calib=calib, scores=first.scores).report["stages"]
    assert again.get("score_reused") and "fisher" not in again  # the score stage did not run
    fid = again["fidelity"]
    assert fid["settings"]["calibration_examples"] == 6 and fid["settings"]["grad_batch_size"] == 32
    assert any("6 calibration examples" in d for d in fid["deviations"])
