"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): neurons per expert.

The shared per-family contract (masked == pruned, cost vs fvcore, save / reload, one prune per
structured method, ``harness prune`` on a model directory) runs over these families in
test_surgery.py / test_cost.py / test_families.py; here what is particular to them.
"""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.cost import CostModel
from tshrink.flops import measure_flops
from tshrink.masking import soft_masks
from tshrink.pipeline import prune
from tshrink.selection import equalize_experts
from tshrink.surgery import apply_selection
from tshrink.testing import MOE
from tshrink.units import Selection


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _per_expert(adapter, k: int, seed: int = 0) -> Selection:
    """Every expert keeps ``k`` random neurons of its own; dense layers ``2k`` random neurons."""
    g = torch.Generator().manual_seed(seed)
    neurons = []
    for layer, n in enumerate(adapter.neuron_counts()):
        E = adapter.experts(layer)
        if E is None:
            neurons.append(torch.randperm(n, generator=g)[:2 * k].tolist())
        else:
            per = n // E
            neurons.append([e * per + int(i) for e in range(E) for i in torch.randperm(per, generator=g)[:k]])
    return Selection([list(range(h)) for h in adapter.head_counts()], neurons)


@pytest.mark.parametrize("family", MOE)
def test_layout_and_virtual_forward(family):
    """The virtual (E*I)-neuron MLP gives the model's own outputs; the model's forward is back
    once the hooks are gone; Qwen2-MoE's dense layer is an ordinary MLP."""
    model = tiny_model(family, "causal-lm")
    adapter = get_adapter(model)
    assert adapter.family == "moe"
    experts = [adapter.experts(layer) for layer in range(adapter.num_layers)]
    assert experts == ([4, None, 4] if family == "qwen2_moe" else [4, 4, 4])
    assert adapter.neuron_counts() == [96, 48, 96] if family == "qwen2_moe" else [96, 96, 96]
    batch = tiny_batches(family).batches[0]
    ref = _logits(model, batch)
    ones = [torch.ones(n) for n in adapter.neuron_counts()]
    with soft_masks(adapter, None, ones):
        assert "forward" in adapter.layers()[0].mlp.__dict__
        torch.testing.assert_close(_logits(model, batch), ref, rtol=1e-5, atol=1e-6)
    assert all("forward" not in layer.mlp.__dict__ for layer in adapter.layers())
    assert not any("_tshrink" in k for k in model.state_dict())


@pytest.mark.parametrize("family", MOE)
def test_masked_equals_pruned_per_expert_and_cost_is_exact(family):
    """Each expert keeps its own neurons (same count): masked == pruned, the 3-D tensors are
    sliced to (E, 2k, H) / (E, H, k), and the analytic cost equals fvcore exactly (the experts
    of a token's top-k run; equal counts make the routed cost independent of the routing)."""
    model = tiny_model(family, "causal-lm")
    adapter = get_adapter(model)
    batch = tiny_batches(family).batches[0]
    cost = CostModel(adapter, 16)
    assert cost.backbone_macs() == measure_flops(model, 16)["total"]
    sel = _per_expert(adapter, 7)
    hm, nm = sel.masks(adapter.head_counts(), adapter.neuron_counts())
    with soft_masks(adapter, hm, nm):
        masked = _logits(model, batch)
    apply_selection(adapter, sel)
    torch.testing.assert_close(_logits(model, batch), masked, rtol=1e-5, atol=1e-6)
    ex = adapter.layers()[0].mlp.experts
    assert tuple(ex.gate_up_proj.shape) == (4, 14, 32) and tuple(ex.down_proj.shape) == (4, 32, 7)
    assert cost.backbone_macs(adapter.widths()) == measure_flops(model, 16)["total"]
    assert model.config._experts_implementation == "eager"  # 7 float32 columns: not 16-byte aligned


@pytest.mark.parametrize("family", MOE)
def test_grads_flow_through_neuron_masks(family):
    model = tiny_model(family, "causal-lm")
    adapter = get_adapter(model)
    batch = tiny_batches(family, labels="lm").batches[0]
    masks = [torch.ones(n, requires_grad=True) for n in adapter.neuron_counts()]
    with soft_masks(adapter, None, masks):
        loss = model(**batch).loss
    loss.backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks)


def test_unequal_counts_are_one_clear_error():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    sel = _per_expert(adapter, 5)
    sel.neurons[1] = sel.neurons[1][1:]  # expert 0 of layer 1 keeps one fewer
    with pytest.raises(ValueError, match=r"selection.neurons\[1\]: the experts keep \[4, 5, 5, 5\] neurons; every "
                                         "expert of a mixture-of-experts layer must keep the same number"):
        apply_selection(adapter, sel)
    assert adapter.neuron_counts() == [96, 96, 96]  # checked before anything was removed


def test_equalize_experts_aggregates_the_count_and_ranks_within_each_expert():
    # 2 experts of 3 neurons; the selector kept 3 of expert 0 and 1 of expert 1 -> k = 2 each
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])
    sel = Selection([[0]], [[0, 1, 2, 4]])
    out, changed = equalize_experts(sel, [scores], [2])
    assert out.neurons == [[0, 2, 4, 5]] and changed == {0: ([3, 1], 2)}
    same, none = equalize_experts(Selection([[0]], [[0, 4]]), [scores], [2])
    assert same.neurons == [[0, 4]] and none == {}
    dense, _ = equalize_experts(Selection([[0]], [[1]]), [scores], [None])
    assert dense.neurons == [[1]]


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "stat", "fisher"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_structured_methods_keep_equal_counts(family, method, tmp_path):
    """Every structured method prunes an MoE model: equal counts per expert (the host evens
    out selectors that do not know experts and records it), within budget, saved and reloaded."""
    from tshrink.checkpoint import load_pruned, save_pruned

    model = tiny_model(family, "causal-lm")
    calib = tiny_batches(family, labels="lm")
    batch = calib.batches[0]
    rep = prune(model, method, 0.6, calib=calib, seed=0).report
    assert 0.3 < rep["flops_kept"] <= 0.6 + 1e-9
    adapter = get_adapter(model)
    for layer in range(adapter.num_layers):
        if adapter.experts(layer) is not None:
            ex = adapter.layers()[layer].mlp.experts
            assert ex.gate_up_proj.shape[1] == 2 * ex.down_proj.shape[2]
    for entry in rep["stages"].get("experts_equalized", []):
        for layer in entry["layers"].values():
            assert len(set(layer["kept_per_expert"])) > 1
    if method == "flap":
        assert "mixture-of-experts layers" in rep["stages"]["flap-bias"]["deviations"][0]
    out = _logits(model, batch)
    save_pruned(model, tmp_path / "m", info={"report": rep})
    again = load_pruned(tmp_path / "m")
    assert get_adapter(again).widths() == adapter.widths()
    torch.testing.assert_close(_logits(again, batch), out, rtol=1e-6, atol=1e-6)


def test_stat_correction_writes_into_the_experts():
    """STAT's least-squares fold reaches the fused down_proj (the virtual view is a copy: the
    fold is written back): the corrected model differs from plain removal of the same units."""
    calib = tiny_batches("qwen3_moe", labels="lm")
    model = tiny_model("qwen3_moe", "causal-lm")
    result = prune(model, "stat", 0.7, calib=calib, seed=0)
    plain = tiny_model("qwen3_moe", "causal-lm")
    apply_selection(get_adapter(plain), result.selection)
    diffs = [float((a.mlp.experts.down_proj - b.mlp.experts.down_proj).detach().abs().max())
             for a, b in zip(get_adapter(model).layers(), get_adapter(plain).layers())
             if a.mlp.experts.down_proj.numel()]
    assert diffs and max(diffs) > 1e-4, diffs
    assert all(info.get("mlp_repick", "").startswith("off") for info in result.report["stages"]["stat:correct"]["layers"]
               if info["neurons"] < 96)


def test_llm_pruner_refuses_with_the_reason():
    from tshrink.errors import StageError

    model = tiny_model("mixtral", "causal-lm")
    with pytest.raises(StageError, match="mixture-of-experts layers \\[0, 1, 2\\] is not implemented"):
        prune(model, "llm-pruner", 0.6, calib=tiny_batches("mixtral", labels="lm"), seed=0)
