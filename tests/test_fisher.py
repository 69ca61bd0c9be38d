"""The Fisher-mask plugin on tiny models: scores, search, rearrangement, tuning, methods.

References are computed independently of the plugin: finite differences of the loss for
the Fisher scores, explicit contribution matrices (one forward per head, LSMR solve) for
the tuned scales, LayerNorm-input hooks on full forward passes for the reconstruction
errors. The math modules have their own tests (test_fisher_math.py).
"""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.calibration import CalibrationData, model_inputs
from tshrink.cost import CostModel
from tshrink.manager import get_plugin_manager
from tshrink.masking import soft_masks
from tshrink.pipeline import prune
from tshrink.registry import Registry
from tshrink.surgery import apply_selection
from tshrink.units import Selection
from tshrink_plugins.fisher.collect import collect_mask_grads
from tshrink_plugins.fisher.fisher_math import fisher_importance, fisher_loss_increase
from tshrink_plugins.fisher.tune_model import fold_scales, tune_masks
from tshrink_plugins.fisher.tuning import tune_scales

HEADS = {"bert": "sequence-classification", "distilbert": "sequence-classification", "llama": "causal-lm"}
LABELS = {"bert": "class", "distilbert": "class", "llama": "lm"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(family: str, seed: int = 0, n_batches: int = 2):
    model = tiny_model(family, HEADS[family], seed=seed)
    return model, tiny_batches(family, n_batches=n_batches, labels=LABELS[family], seed=seed)


def _reference_loss(model, family: str, batch) -> torch.Tensor:
    """The task loss in float64, written out (HF's LM loss upcasts to float32 only)."""
    logits = model(**model_inputs(batch)).logits.double()
    labels = batch["labels"]
    if family == "llama":  # next-token loss: position t predicts token t+1, -100 ignored
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100)


def _masked(adapter, heads, neurons):
    """Own mask hooks (not tshrink.masking): scale O-projection inputs per unit, Down inputs per neuron."""
    handles = []
    for layer in range(adapter.num_layers):
        a, m = adapter.attn(layer), adapter.mlp(layer)
        width = a.head_dim * a.group
        handles.append(a.o.register_forward_pre_hook(
            lambda mod, args, h=heads[layer], w=width: (args[0] * h.repeat_interleave(w),)))
        handles.append(m.out.register_forward_pre_hook(lambda mod, args, n=neurons[layer]: (args[0] * n,)))
    return handles


def _reference_grads(model, family, adapter, batch, heads, neurons, *, grad: bool):
    handles = _masked(adapter, heads, neurons)
    try:
        loss = _reference_loss(model, family, batch)
        return torch.autograd.grad(loss, heads + neurons) if grad else loss.item()
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fisher_scores_match_autograd_and_finite_differences(family):
    model, calib = _setup(family)
    model.double()
    adapter = get_adapter(model)
    n = adapter.num_layers
    head_grads, neuron_grads = collect_mask_grads(adapter, calib)
    assert [tuple(g.shape) for g in head_grads] == [(2, c) for c in adapter.head_counts()]

    def ones():
        return ([torch.ones(c, dtype=torch.float64, requires_grad=True) for c in adapter.head_counts()],
                [torch.ones(c, dtype=torch.float64, requires_grad=True) for c in adapter.neuron_counts()])

    # Llama's RMSNorm computes in float32 even in a float64 model: larger steps keep the rounding out
    eps, rel = (1e-5, 1e-5) if family == "bert" else (1e-2, 1e-2)
    for b, batch in enumerate(calib.batches):
        ref = _reference_grads(model, family, adapter, batch, *ones(), grad=True)
        for layer in range(n):
            torch.testing.assert_close(head_grads[layer][b].double(), ref[layer], rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(neuron_grads[layer][b].double(), ref[n + layer], rtol=1e-4, atol=1e-9)
        # the autograd reference itself against central differences, for a few units
        for kind, layer, unit in ((0, 0, 1), (0, n - 1, 0), (1, 1, 5)):
            loss = []
            for sign in (1.0, -1.0):
                masks = ones()
                with torch.no_grad():
                    masks[kind][layer][unit] += sign * eps
                loss.append(_reference_grads(model, family, adapter, batch, *masks, grad=False))
            fd = (loss[0] - loss[1]) / (2 * eps)
            assert ref[kind * n + layer][unit].item() == pytest.approx(fd, rel=rel, abs=1e-10)
    torch.testing.assert_close(fisher_importance(head_grads[0]), head_grads[0].pow(2).sum(0))


def test_per_example_gradients_and_model_left_untouched():
    model, calib = _setup("bert")
    adapter = get_adapter(model)
    model.classifier.weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    per_example, _ = collect_mask_grads(adapter, calib, grad_batch_size=1)
    singles = CalibrationData([{k: v[i:i + 1] for k, v in b.items()} for b in calib.batches for i in range(3)])
    reference, _ = collect_mask_grads(adapter, singles)
    assert per_example[0].shape == (calib.n_examples, 4)
    for a, b in zip(per_example, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="fisher_grad_batch_size"):
        collect_mask_grads(adapter, calib, grad_batch_size=-1)
    with pytest.raises(ValueError, match="no 'labels'"):
        collect_mask_grads(adapter, tiny_batches("bert"))


# ----------------------------------------------------------------------------- search
def test_search_meets_budget_and_uses_it():
    pm = get_plugin_manager()
    for family in ("bert", "llama", "ragged"):
        for budget in (0.1, 0.6, 1.0):
            model, calib = _setup("bert" if family == "ragged" else family)
            if family == "ragged":  # non-uniform widths from an earlier pruning
                apply_selection(get_adapter(model), Selection([[0, 1, 2], [1], [0, 2, 3]],
                                                              [list(range(40)), list(range(10)), list(range(48))]))
            adapter = get_adapter(model)
            cost = CostModel(adapter, calib.seq_len)
            result = prune(model, "fisher-search", budget, calib=calib, pm=pm)
            kept = result.report["layer_macs_after"]
            assert kept <= cost.budget_macs(budget) + 1e-6
            neurons_all = sum(result.report["widths_after"]["neurons"]) == sum(cost.dense["neurons"])
            # every layer's neuron costs the same, so the longest neuron prefix was taken: no neuron still fits
            if not neurons_all:
                assert cost.budget_macs(budget) - kept < cost.layers[0].neuron
            if budget == 1.0:
                assert result.report["widths_after"] == cost.dense


def test_search_keeps_the_globally_most_important_heads():
    model, calib = _setup("bert", seed=1)
    adapter = get_adapter(model)
    head_grads, _ = collect_mask_grads(adapter, calib, grad_batch_size=32)  # what 'auto' gives a classifier
    imp = torch.cat([fisher_importance(g) for g in head_grads])  # (layers*units,), equal costs
    result = prune(model, "fisher-search", 0.5, calib=calib)
    kept = torch.zeros_like(imp, dtype=torch.bool)
    for layer, heads in enumerate(result.selection.heads):
        kept[[layer * 4 + h for h in heads]] = True
    assert 0 < int(kept.sum()) < imp.numel()
    assert imp[kept].min() >= imp[~kept].max()


# ----------------------------------------------------------------------------- rearrangement
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_rearrangement_keeps_counts_and_never_raises_the_fisher_estimate(family):
    selections = {}
    for method in ("fisher-search", "fisher-rearrange"):
        model, calib = _setup(family, n_batches=3)
        selections[method] = prune(model, method, 0.5, calib=calib, options={"fisher_grad_batch_size": 0}).selection
    model, calib = _setup(family, n_batches=3)
    adapter = get_adapter(model)
    grads = collect_mask_grads(adapter, calib)
    counts = (adapter.head_counts(), adapter.neuron_counts())
    search, moved = selections["fisher-search"], selections["fisher-rearrange"]
    assert search.widths() == moved.widths()
    total = {}
    for name, sel in (("search", search), ("moved", moved)):
        masks = sel.masks(*counts)  # the per-layer Fisher estimate that the rearrangement minimises
        total[name] = [float(fisher_loss_increase(m.bool(), g))
                       for kind in range(2) for m, g in zip(masks[kind], grads[kind])]
    assert all(a <= b * (1 + 1e-9) + 1e-30 for a, b in zip(total["moved"], total["search"]))


def test_rearrangement_needs_fisher_gradients():
    model, calib = _setup("bert")
    with pytest.raises(ValueError, match="needs the per-batch mask gradients"):
        prune(model, "score=magnitude,select=fisher-search,refine=fisher-rearrange", 0.5, calib=calib)


# ----------------------------------------------------------------------------- tuning
NORM_INPUTS = {  # the pre-LayerNorm sums of the two sub-layers: (module, its input or output)
    "bert": lambda m, l: ((m.bert.encoder.layer[l].attention.output.LayerNorm, "in"),
                          (m.bert.encoder.layer[l].output.LayerNorm, "in")),
    "distilbert": lambda m, l: ((m.distilbert.transformer.layer[l].sa_layer_norm, "in"),
                                (m.distilbert.transformer.layer[l].output_layer_norm, "in")),
    "llama": lambda m, l: ((m.model.layers[l].post_attention_layernorm, "in"), (m.model.layers[l], "out")),
}


def _grab(model, calib, adapter, modules, heads=None, neurons=None) -> list[torch.Tensor]:
    """Inputs/outputs of ``modules`` over the real tokens of all batches, each (tokens, features)."""
    store = [[] for _ in modules]
    handles, mask = [], {}
    for i, (mod, where) in enumerate(modules):
        def hook(module, args, out=None, i=i, where=where):
            x = args[0] if where == "in" else (out[0] if isinstance(out, tuple) else out)
            store[i].append(x[mask["m"]].detach().double())
        handles.append(mod.register_forward_pre_hook(hook) if where == "in" else mod.register_forward_hook(hook))
    try:
        with torch.no_grad(), soft_masks(adapter, heads, neurons):
            for b in calib.batches:
                mask["m"] = b["attention_mask"].bool()
                model(**model_inputs(b))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in store]


@pytest.mark.parametrize("family", ["bert", "distilbert", "llama"])
def test_tuning_matches_an_explicit_least_squares_and_lowers_each_sublayer_error(family):
    model, calib = _setup(family, seed=2)
    adapter = get_adapter(model)
    counts = (adapter.head_counts(), adapter.neuron_counts())
    g = torch.Generator().manual_seed(0)
    sel = Selection([torch.randperm(n, generator=g)[: n // 2 + l % 2].tolist() for l, n in enumerate(counts[0])],
                    [torch.randperm(n, generator=g)[: n // 3].tolist() for n in counts[1]])
    damp = 1e-2
    result = tune_masks(adapter, calib, sel, damp=damp)
    assert len(result.stats) == 2 * adapter.num_layers and result.rejected == 0
    tuned = {"heads": result.heads, "neurons": result.neurons}
    binary = dict(zip(("heads", "neurons"), sel.masks(*counts)))
    improved = 0
    for step, stat in enumerate(result.stats):
        layer, kind = stat["layer"], "heads" if stat["kind"] == "attention" else "neurons"
        # student: tuned masks before this sub-layer, 0/1 at it (and after it: no influence here)
        masks = {k: [t.clone() if (l < layer or (l == layer and k == "heads" and kind == "neurons")) else b.clone()
                     for l, (t, b) in enumerate(zip(tuned[k], binary[k]))] for k in tuned}
        sum_mod = NORM_INPUTS[family](model, layer)[0 if kind == "heads" else 1]
        proj = adapter.attn(layer).o if kind == "heads" else adapter.mlp(layer).out
        teacher = _grab(model, calib, adapter, [sum_mod])[0]
        student, x_in = _grab(model, calib, adapter, [sum_mod, (proj, "in")], masks["heads"], masks["neurons"])
        kept = torch.tensor((sel.heads if kind == "heads" else sel.neurons)[layer])
        w = proj.weight.detach().double()
        if kind == "heads":  # one column per kept head: x_u W_u^T, from a one-hot mask forward
            cols = []
            for u in kept.tolist():
                one_hot = [m.clone() for m in masks["heads"]]
                one_hot[layer] = torch.zeros_like(one_hot[layer])
                one_hot[layer][u] = 1.0
                out = _grab(model, calib, adapter, [(proj, "out")], one_hot, masks["neurons"])[0]
                cols.append((out - (proj.bias.detach().double() if proj.bias is not None else 0)).reshape(-1))
            contrib = torch.stack(cols, 1)  # (tokens*hidden, k)
        else:
            contrib = torch.stack([(x_in[:, n:n + 1] * w[:, n]).reshape(-1) for n in kept.tolist()], 1)
        target = (teacher - student).reshape(-1) + contrib.sum(1)  # t with C @ 1 == student's contribution
        ref, ok = tune_scales(contrib, target, damp=damp)
        assert ok
        got = tuned[kind][layer][kept].double()
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-5)
        before = (contrib.sum(1) - target).pow(2).sum()
        after = (contrib @ got - target).pow(2).sum()
        assert after <= before * (1 + 1e-6)
        improved += bool(after < 0.999 * before)
        # the whole model with the tuned mask at this sub-layer: the error its LayerNorm sees
        masks[kind][layer] = tuned[kind][layer].clone()
        student_tuned = _grab(model, calib, adapter, [sum_mod], masks["heads"], masks["neurons"])[0]
        torch.testing.assert_close((student_tuned - teacher).pow(2).sum(), after, rtol=1e-3, atol=1e-8)
        assert stat["rel_error_after"] / stat["rel_error_before"] == pytest.approx(float(after / before), rel=1e-3)
    assert improved >= len(result.stats) // 2


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_folding_tuned_masks_equals_the_masked_model(family):
    model, calib = _setup(family, seed=3)
    adapter = get_adapter(model)
    heads = [[0, 2], [1], [0, 1, 3]] if family == "bert" else [[0], [1], [0, 1]]  # llama: 2 KV groups
    sel = Selection(heads, [list(range(0, 48, 2))] * 3)
    result = tune_masks(adapter, calib, sel, damp=0.0, bounds=(-50.0, 50.0))
    assert any((m[m != 0] - 1).abs().max() > 1e-3 for m in result.heads + result.neurons)
    batch = calib.batches[0]
    with torch.no_grad(), soft_masks(adapter, result.heads, result.neurons):
        masked = model(**model_inputs(batch)).logits
    fold_scales(adapter, sel, result.heads, result.neurons)
    apply_selection(adapter, sel)
    with torch.no_grad():
        pruned = model(**model_inputs(batch)).logits
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)


def test_tuning_recovers_a_pruned_duplicate_head_exactly():
    model, calib = _setup("bert", seed=4)
    adapter = get_adapter(model)
    a, d = adapter.attn(1), adapter.attn(1).head_dim
    with torch.no_grad():  # head 1 of layer 1 becomes a copy of head 0: scale 2 on head 0 replaces it
        for lin in (a.q, a.k, a.v):
            lin.weight[d:2 * d] = lin.weight[:d]
            lin.bias[d:2 * d] = lin.bias[:d]
        a.o.weight[:, d:2 * d] = a.o.weight[:, :d]
    batch = calib.batches[0]
    last = lambda m: m(**model_inputs(batch), output_hidden_states=True).hidden_states[-1]  # noqa: E731
    with torch.no_grad():
        dense = last(model)
    full = Selection.full(adapter.head_counts(), adapter.neuron_counts())
    sel = Selection([full.heads[0], [0, 2, 3], full.heads[2]], full.neurons)
    untuned = tiny_model("bert", HEADS["bert"], seed=4)
    untuned.load_state_dict(model.state_dict())
    apply_selection(get_adapter(untuned), sel)
    result = tune_masks(adapter, calib, sel, damp=0.0)
    torch.testing.assert_close(result.heads[1], torch.tensor([2.0, 0.0, 1.0, 1.0]), rtol=1e-4, atol=1e-4)
    fold_scales(adapter, sel, result.heads, result.neurons)
    apply_selection(adapter, sel)
    with torch.no_grad():
        tuned_out, untuned_out = last(model), last(untuned)  # (batch, seq, hidden)
    torch.testing.assert_close(tuned_out, dense, rtol=1e-5, atol=1e-5)
    assert (untuned_out - dense).abs().max() > 100 * (tuned_out - dense).abs().max()


# ----------------------------------------------------------------------------- methods
@pytest.mark.parametrize("family", ["bert", "distilbert", "llama"])
def test_fisher_end_to_end(family):
    model, calib = _setup(family)
    result = prune(model, "fisher", 0.5, calib=calib, options={"fisher_grad_batch_size": 2})
    rep = result.report
    assert rep["flops_kept"] <= 0.5 + 1e-9 and rep["params_after"] < rep["params_before"]
    stages = rep["stages"]
    assert stages["fisher"]["grad_batches"] == 3  # 6 examples regrouped in mini-batches of 2
    assert stages["fisher-rearrange"]["fisher_loss_after"] <= stages["fisher-rearrange"]["fisher_loss_before"]
    assert stages["fisher-tune"]["sublayers"] > 0
    assert stages["fisher-tune"]["mean_rel_error_after"] <= stages["fisher-tune"]["mean_rel_error_before"]
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(calib.batches[0])).logits).all()


def test_registry_declarations_and_option_errors():
    registry = Registry(get_plugin_manager())
    for name in ("fisher", "fisher-search", "fisher-rearrange"):
        assert name in registry.methods
    assert registry.methods["fisher"].compare_by_default
    assert registry.needs(registry.methods["fisher"].recipe) == {"calibration": True, "gradients": True, "labels": True}
    assert "fisher-stat" in registry.methods or "fisher-stat" in registry.unavailable
    blocked = Registry(get_plugin_manager(block=["stat"]))
    assert "fisher-stat" in blocked.unavailable and "fisher" in blocked.methods
    model, calib = _setup("bert")
    with pytest.raises(ValueError, match="fisher_scale_bound"):
        prune(model, "fisher", 0.5, calib=calib, options={"fisher_scale_bound": 0.5})
