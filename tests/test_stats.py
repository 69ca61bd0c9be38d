"""tshrink.stats against a hand computation on the whole model's forward pass."""
from __future__ import annotations

import pytest
import torch

from tshrink.arch.families import get_adapter
from tshrink.calibration import model_inputs
from tshrink.masking import soft_masks
from tshrink.stats import UnitSums, layer_stats
from tshrink.testing import tiny_batches, tiny_model


def _reference_inputs(adapter, calib, layer, masks=None):
    """Real-token rows of layer ``layer``'s o_proj and down_proj inputs from full forwards."""
    got = {"heads": [], "neurons": []}
    a, m = adapter.attn(layer), adapter.mlp(layer)
    hooks = [a.o.register_forward_pre_hook(lambda mod, args: got["heads"].append(args[0])),
             m.out.register_forward_pre_hook(lambda mod, args: got["neurons"].append(args[0]))]
    try:
        with torch.no_grad(), soft_masks(adapter, *(masks or (None, None))):
            for b in calib.batches:
                adapter.backbone()(**model_inputs(b))
    finally:
        for h in hooks:
            h.remove()
    real = [b["attention_mask"].bool() for b in calib.batches]
    # (tokens, n); OPT hands its MLP (batch*seq, n)
    return {k: torch.cat([x[r if x.dim() == 3 else r.reshape(-1)] for x, r in zip(v, real)]).double()
            for k, v in got.items()}


@pytest.mark.parametrize("family", ["bert", "llama", "opt"])
def test_sums_and_grams_match_the_full_forward(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    calib = tiny_batches(family)  # bert: one padded row per batch
    by_layer = {st.layer: st for st in layer_stats(adapter, calib, gram="unit")}
    full = {st.layer: st for st in layer_stats(adapter, calib, gram="full")}
    assert sorted(by_layer) == [0, 1, 2]
    for layer, st in by_layer.items():
        ref = _reference_inputs(adapter, calib, layer)
        width = st.head_width
        assert width == (16 if family == "llama" else 8)  # GQA: 2 query heads of 8 per KV group
        for kind, acc in (("heads", st.heads), ("neurons", st.neurons)):
            X = ref[kind]
            units = X.shape[1] // (width if kind == "heads" else 1)
            blocks = X.reshape(X.shape[0], units, -1)  # (tokens, units, width)
            assert acc.count == calib.n_tokens == X.shape[0]
            torch.testing.assert_close(acc.sum, blocks.sum(0))
            torch.testing.assert_close(acc.sq_norm, blocks.square().sum((0, 2)))
            torch.testing.assert_close(acc.var, blocks.var(0, unbiased=False))
            torch.testing.assert_close(acc.gram, torch.einsum("tui,tuj->uij", blocks, blocks))
            torch.testing.assert_close(getattr(full[layer], kind).gram, X.T @ X)
        assert st.head_weight().shape == (32, st.attn.units, width)


def test_sequential_stream_sees_the_kept_units_only():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    calib = tiny_batches("llama")
    keep_heads, keep_neurons = [1], list(range(0, 48, 2))
    seen = []
    for st in layer_stats(adapter, calib, sequential=True):
        seen.append(st)
        if st.layer == 0:
            st.keep(heads=keep_heads, neurons=keep_neurons)
    hm, nm = [torch.zeros(2), None, None], [torch.zeros(48), None, None]
    hm[0][keep_heads], nm[0][keep_neurons] = 1.0, 1.0
    ref = _reference_inputs(adapter, calib, 1, masks=(hm, nm))
    torch.testing.assert_close(seen[1].neurons.sum.flatten(), ref["neurons"].sum(0))
    dense = _reference_inputs(adapter, calib, 1)
    assert not torch.allclose(seen[1].neurons.sum.flatten(), dense["neurons"].sum(0))
    # without keep(): the sequential stream equals the one-pass stream
    one_pass = list(layer_stats(adapter, calib))
    again = list(layer_stats(adapter, calib, sequential=True))
    for a, b in zip(one_pass, again):
        torch.testing.assert_close(a.heads.sq_sum, b.heads.sq_sum)


def test_rows_with_nan_are_dropped_and_counted():
    acc = UnitSums(2, 3, gram="unit")
    x = torch.arange(24, dtype=torch.float32).reshape(1, 4, 6)
    x[0, 1, 2] = float("nan")
    acc.update(x, torch.tensor([[True, True, True, False]]))
    assert (acc.count, acc.dropped) == (2, 1)
    rows = x[0, [0, 2]].double().reshape(2, 2, 3)
    torch.testing.assert_close(acc.sum, rows.sum(0))
    with pytest.raises(ValueError, match=r"gram='blocks' is not one of"):
        UnitSums(2, 3, gram="blocks")
