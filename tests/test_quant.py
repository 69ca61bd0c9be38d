"""The quant plugin end to end: scopes, stages through tshrink.prune, packing on disk, restore."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.checkpoint import COMPRESSED, load_pruned, save_pruned
from tshrink.pipeline import prune
from tshrink_plugins.quant.apply import compressed_size_bytes, restore, size_report
from tshrink_plugins.quant.scope import role, scope_linears
from tshrink_plugins.quant.unstructured import n_pruned


def _setup(family: str, labels: bool = True):
    causal = family == "llama"
    model = tiny_model(family, head="causal-lm" if causal else "sequence-classification")
    calib = tiny_batches(family, labels=("lm" if causal else "class") if labels else None)
    return model, calib


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _groups(W: torch.Tensor, granularity: str, group_size: int = 0) -> torch.Tensor:
    return {"layer": W.reshape(1, -1), "row": W.reshape(W.shape[0], -1),
            "group": W.reshape(-1, group_size or 1)}[granularity]


def _mean_loss(model, calib) -> float:
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in calib.batches) / len(calib.batches)


# ------------------------------------------------------------------ scope


@pytest.mark.parametrize("family", ["bert", "distilbert", "llama"])
def test_scope_selects_the_adapters_attention_and_mlp_weights(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    attn, mlp = set(), set()
    for layer in range(ad.num_layers):
        a, m = ad.attn(layer), ad.mlp(layer)
        attn |= {id(x.weight) for x in (a.q, a.k, a.v, a.o)}
        mlp |= {id(x.weight) for x in [*m.inputs, m.out]}
    got = {s: {id(lin.weight) for _, lin in scope_linears(model, s)} for s in ("attention", "mlp", "all")}
    assert got["attention"] == attn and got["mlp"] == mlp and got["all"] == attn | mlp
    for name, lin in scope_linears(model, "all"):
        assert model.get_parameter(name) is lin.weight


def test_scope_roles_by_name():
    assert role("encoder.layer.0.attention.self.query") == "self"
    assert role("encoder.layer.0.attention.output.dense") == "self"
    assert role("encoder.layer.0.output.dense") == "mlp"
    assert role("model.decoder.layers.1.encoder_attn.q_proj") == "cross"
    assert role("encoder.layer.2.crossattention.self.key") == "cross"
    assert role("decoder.block.0.layer.1.EncDecAttention.q") == "cross"
    assert role("decoder.block.0.layer.0.SelfAttention.o") == "self"
    assert role("decoder.block.0.layer.2.DenseReluDense.wi") == "mlp"
    for outside in ("lm_head", "pooler.dense", "classifier", "model.shared"):
        assert role(outside) is None
    with pytest.raises(ValueError, match="quant_scope"):
        scope_linears(tiny_model("bert"), "cross")


def test_scope_on_a_pruned_layer_skips_empty_attention():
    model = tiny_model("llama", head="causal-lm")
    from tshrink.surgery import apply_selection
    from tshrink.units import Selection

    ad = get_adapter(model)
    sel = Selection.full(ad.head_counts(), ad.neuron_counts())
    sel.heads[1] = []
    apply_selection(ad, sel)
    names = [n for n, _ in scope_linears(model, "attention")]
    assert not any(".layers.1." in n for n in names) and len(names) == 8


# ------------------------------------------------------------------ what the stages leave in the model


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("bits,granularity", [(1, "row"), (2, "layer"), (3, "row"), (2, "group")])
def test_kmeans_leaves_at_most_2_to_the_bits_values_per_codebook(family, bits, granularity):
    model, calib = _setup(family)
    gs = 16 if granularity == "group" else 0
    res = prune(model, "kmeans", 1.0, calib=calib, options={"quant_bits": bits, "quant_granularity": granularity,
                                                              "quant_group_size": gs})
    linears = scope_linears(model, "all")
    for _, lin in linears:
        for row in _groups(lin.weight.detach(), granularity, gs):
            assert row.unique().numel() <= 2**bits
    rep = res.report["transforms"]["kmeans"]
    assert rep["bits"] == bits and rep["quantized_params"] == sum(lin.weight.numel() for _, lin in linears)
    assert 0 < rep["relative_weight_error"] < 1


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", ["binarize", "bs-flex"])
@pytest.mark.parametrize("granularity", ["row", "group"])
def test_binarization_leaves_exactly_two_values_per_row_or_group(family, method, granularity):
    model, calib = _setup(family)
    gs = 8 if granularity == "group" else 0
    opts = {"quant_granularity": granularity, "quant_group_size": gs}
    if method == "bs-flex":
        opts |= {"quant_flex_steps": 3}  # default lr: small moves, no group collapses to one value
    res = prune(model, method, 1.0, calib=calib, options=opts)
    for _, lin in scope_linears(model, "all"):
        counts = [row.unique().numel() for row in _groups(lin.weight.detach(), granularity, gs)]
        assert all(c == 2 for c in counts), counts
    assert res.report["transforms"][method]["bits"] == 1


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("scope", ["attention", "mlp"])
@pytest.mark.parametrize("method", ["kmeans", "bs-flex", "imp"])
def test_scope_changes_only_its_weights(family, scope, method):
    model, calib = _setup(family)
    before = _state(model)
    prune(model, method, 1.0, calib=calib, options={"quant_scope": scope})
    inside = {n for n, _ in scope_linears(model, scope)}
    after = model.state_dict()
    for name, value in before.items():
        if name in inside:
            assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name  # other Linears, embeddings, norms, biases


# ------------------------------------------------------------------ storage


def _expected_packed_bytes(model, bits: int, granularity: str) -> int:
    """Independent count of the packed payload + shape headers for k-means codebooks."""
    total = 0
    for _, lin in scope_linears(model, "all"):
        W = lin.weight
        groups = 1 if granularity == "layer" else W.shape[0]
        total += math.ceil(W.numel() * bits / 8) + groups * 2**bits * 4 + 8 * W.dim()
    return total


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method,opts,bits,granularity", [
    ("kmeans", {"quant_bits": 4, "quant_granularity": "layer"}, 4, "layer"),
    ("kmeans", {"quant_bits": 2}, 2, "row"),
    ("binarize", {}, 1, "row"),
])
def test_save_load_is_exact_and_the_compressed_file_shrinks(family, method, opts, bits, granularity, tmp_path):
    model, calib = _setup(family)
    res = prune(model, method, 1.0, calib=calib, options=opts)
    rep = res.report["transforms"][method]
    expected = _expected_packed_bytes(model, bits, granularity)
    assert rep["packed_bytes"] == expected
    assert rep["float_bytes"] == 4 * rep["quantized_params"]
    save_pruned(model, tmp_path / "m", compressed=res.compressed)
    again = load_pruned(tmp_path / "m")
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())
    # the compact file holds exactly the packed tensors; its header is small
    data = sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "m" / COMPRESSED)).values())
    file_bytes = (tmp_path / "m" / COMPRESSED).stat().st_size
    assert data == expected and file_bytes - data < 3 * 200 * rep["weights"]  # 3 JSON entries per weight
    # 32-bit floats -> `bits` per weight plus the codebooks
    assert rep["bits_per_weight"] == pytest.approx(8 * (expected - sum(8 * lin.weight.dim() for _, lin in
                                                                         scope_linears(model, "all")))
                                                   / rep["quantized_params"])
    assert bits <= rep["bits_per_weight"] < bits + (32 * 2**bits / 32 if granularity == "row" else 1)
    # size on disk: compressed file + the float tensors it does not replace
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    inside = {n for n, _ in scope_linears(model, "all")}
    rest = sum(t.numel() * t.element_size() for k, t in state.items() if k not in inside)
    assert compressed_size_bytes(tmp_path / "m") == file_bytes + rest
    sizes = size_report(tmp_path / "m")
    assert sizes["float_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert sizes["ratio_vs_float"] > 1


@pytest.mark.parametrize("method", ["kmeans", "binarize", "bs-flex", "imp"])
def test_restore_rebuilds_the_weights_from_the_compact_form_alone(method, tmp_path):
    model, calib = _setup("llama")
    opts = {"quant_flex_steps": 2} if method == "bs-flex" else {}
    res = prune(model, method, 1.0, calib=calib, options=opts)
    fresh = tiny_model("llama", head="causal-lm", seed=1)  # different weights everywhere
    part = res.compressed[method]
    restore(fresh, part["tensors"], part["meta"])
    for name, _ in scope_linears(model, "all"):
        assert torch.equal(fresh.get_parameter(name), model.get_parameter(name)), name
    bad = dict(part["meta"], format="other/1")
    with pytest.raises(ValueError, match="format"):
        restore(fresh, part["tensors"], bad)


# ------------------------------------------------------------------ IMP, BS-Flex, retraining


@pytest.mark.parametrize("ranking", ["global", "layer"])
@pytest.mark.parametrize("schedule,targets", [("30,50", [0.3, 0.5]), ("50,80", [0.5, 0.8])])
def test_imp_reaches_exact_sparsity_each_step(ranking, schedule, targets):
    model, calib = _setup("llama")
    res = prune(model, "imp", 1.0, calib=calib, options={"quant_imp_schedule": schedule, "quant_imp_ranking": ranking,
                                                          "quant_imp_steps": 2, "quant_lr": 1e-2})
    rep = res.report["transforms"]["imp"]
    sizes = [lin.weight.numel() for _, lin in scope_linears(model, "all")]
    for step, target in zip(rep["steps"], targets):
        want = n_pruned(target, sum(sizes)) if ranking == "global" else sum(n_pruned(target, n) for n in sizes)
        assert step["sparsity"] == target and step["pruned"] == want
        assert "recovery" in step and step["recovery"]["steps"] == 2
    zeros = sum(int((lin.weight == 0).sum()) for _, lin in scope_linears(model, "all"))
    assert zeros == rep["steps"][-1]["pruned"]
    assert rep["bits_per_weight"] == pytest.approx(1 + 32 * (1 - zeros / sum(sizes)))


def test_bs_flex_without_steps_is_the_one_shot_binarization():
    a, calib = _setup("llama")
    b, _ = _setup("llama")
    prune(a, "binarize", 1.0, calib=calib)
    prune(b, "bs-flex", 1.0, calib=calib, options={"quant_flex_steps": 0})
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_bs_flex_recovery_lowers_the_calibration_loss_and_moves_weights():
    one_shot, calib = _setup("llama")
    prune(one_shot, "bs-flex", 1.0, calib=calib, options={"quant_flex_steps": 0})
    flex, _ = _setup("llama")
    res = prune(flex, "bs-flex", 1.0, calib=calib, options={"quant_flex_steps": 20, "quant_lr": 1e-2})
    rep = res.report["transforms"]["bs-flex"]
    assert _mean_loss(flex, calib) < _mean_loss(one_shot, calib) - 0.05
    assert rep["recovery"]["loss_after"] == pytest.approx(_mean_loss(flex, calib), rel=1e-5)
    assert rep["moved_fraction"] > 0


def test_centroid_retraining_keeps_assignments_and_lowers_the_loss():
    plain, calib = _setup("llama")
    r0 = prune(plain, "kmeans", 1.0, calib=calib, options={"quant_bits": 2})
    tuned, _ = _setup("llama")
    r1 = prune(tuned, "kmeans", 1.0, calib=calib, options={"quant_bits": 2, "quant_retrain_steps": 10, "quant_lr": 1e-2})
    t0, t1 = r0.compressed["kmeans"]["tensors"], r1.compressed["kmeans"]["tensors"]
    for key in t0:
        if key.endswith(".indices"):
            assert torch.equal(t0[key], t1[key]), key
    assert any(not torch.equal(t0[k], t1[k]) for k in t0 if k.endswith(".codebook"))
    assert _mean_loss(tuned, calib) < _mean_loss(plain, calib)


def test_distillation_recovery_needs_no_labels():
    model = tiny_model("bert")  # no task head, hence no loss
    calib = tiny_batches("bert")
    res = prune(model, "bs-flex", 1.0, calib=calib, options={"quant_flex_steps": 10, "quant_lr": 1e-3})
    rec = res.report["transforms"]["bs-flex"]["recovery"]
    assert rec["loss"] == "distill" and rec["loss_after"] < 0.5 * rec["loss_before"]


def test_training_without_suitable_calibration_is_a_clear_error():
    model, _ = _setup("bert")
    with pytest.raises(ValueError, match="calibration"):
        prune(model, "kmeans", 1.0, calib=None, options={"quant_retrain_steps": 2})
    with pytest.raises(ValueError, match="labels"):
        prune(model, "bs-flex", 1.0, calib=tiny_batches("bert"), options={"quant_loss": "labels"})
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(model, "bs-flex", 1.0, calib=None)


@pytest.mark.parametrize("opts,match", [
    ({"quant_granularity": "group"}, "quant_group_size"),
    ({"quant_group_size": 8}, "only used with"),
    ({"quant_granularity": "group", "quant_group_size": 5}, "group_size"),
    ({"quant_bits": 9}, "bits"),
    ({"quant_scope": "cross"}, "quant_scope"),
])
def test_bad_options(opts, match):
    model, _ = _setup("bert")
    with pytest.raises(ValueError, match=match):
        prune(model, "kmeans", 1.0, options=opts)


# ------------------------------------------------------------------ composition and plugin hygiene


def test_structured_pruning_then_quantization_composes(tmp_path):
    model, calib = _setup("llama")
    res = prune(model, "score=magnitude,select=global,transform=kmeans", 0.6, calib=calib)
    assert res.report["flops_kept"] <= 0.6 and res.report["params_after"] < res.report["params_before"]
    for _, lin in scope_linears(model, "all"):
        assert all(row.unique().numel() <= 16 for row in lin.weight)
    save_pruned(model, tmp_path / "m", compressed=res.compressed)
    again = load_pruned(tmp_path / "m")
    ids = calib.batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_plugin_module_does_not_import_torch():
    code = "import sys, tshrink_plugins.quant.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
