"""Every registered method, built-in or third-party, goes through the same contract.

On a tiny encoder and a tiny GQA decoder: the method runs through :func:`tshrink.prune`,
meets its FLOPs budget, leaves a model that runs, and saves/reloads to identical outputs.
New plugins are picked up automatically (entry points), so this file never names a method.
"""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.checkpoint import load_pruned, save_pruned
from tshrink.manager import get_plugin_manager
from tshrink.pipeline import prune
from tshrink.registry import Registry

REGISTRY = Registry(get_plugin_manager())
METHODS = sorted(REGISTRY.methods)


def _setup(family: str, needs: dict[str, bool]):
    causal = family == "llama"
    model = tiny_model(family, head="causal-lm" if causal else "sequence-classification")
    calib = tiny_batches(family, labels=("lm" if causal else "class"))
    return model, calib


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_method_contract(method, family, tmp_path):
    spec = REGISTRY.method(method)
    model, calib = _setup(family, REGISTRY.needs(spec.recipe))
    batch = calib.batches[0]
    result = prune(model, method, 0.6, calib=calib, seed=0)
    rep = result.report
    if spec.recipe.prunes:
        # a select stage with a latency budget meets it itself (tested with its plugin); FLOPs may differ
        if REGISTRY.stage("select", spec.recipe.select).budget == "flops":
            assert rep["flops_kept"] <= 0.6 + 1e-9, rep["flops_kept"]
            assert rep["flops_kept"] > 0.3  # a selector should use its budget, not throw it away
        assert rep["params_after"] < rep["params_before"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(out).all()
    save_pruned(model, tmp_path / "m", compressed=result.compressed, info={"report": rep})
    again = load_pruned(tmp_path / "m")
    with torch.no_grad():
        out2 = again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_method_is_deterministic(method):
    outs = []
    for _ in range(2):
        model, calib = _setup("llama", {})
        prune(model, method, 0.7, calib=calib, seed=3)
        with torch.no_grad():
            outs.append(model(input_ids=calib.batches[0]["input_ids"]).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


PRUNING = [m for m in METHODS if REGISTRY.method(m).recipe.prunes]


@pytest.mark.parametrize("method", PRUNING)
def test_scores_do_not_depend_on_the_budget(method):
    """The score hook's contract: scores from a run at one budget, reused at another, give
    exactly the model a fresh run gives (``harness compare`` scores once per method)."""
    model, calib = _setup("llama", {})
    first = prune(model, method, 0.8, calib=calib, seed=3)
    assert first.scores is not None
    outs = []
    for scores in (None, first.scores):
        model, _ = _setup("llama", {})
        res = prune(model, method, 0.6, calib=calib, seed=3, scores=scores)
        assert res.report["stages"].get("score_reused", False) is (scores is not None)
        with torch.no_grad():
            outs.append(model(input_ids=calib.batches[0]["input_ids"]).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_missing_calibration_and_labels_are_errors():
    needing = [m for m in METHODS if REGISTRY.needs(REGISTRY.method(m).recipe)["calibration"]]
    if not needing:
        pytest.skip("no registered method needs calibration data")
    model = tiny_model("bert", head="sequence-classification")
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(model, needing[0], 0.5, calib=None)
