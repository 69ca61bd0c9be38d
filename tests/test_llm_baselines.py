"""The training-free LLM baselines (FLAP, Wanda-sp, LLM-Pruner w/o tuning) against hand
computations of their papers' / reference code's formulas on a tiny GQA Llama, the added
output-projection biases' save / reload round trip, and recipes mixing their stages."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.pipeline import prune


def _dense_inputs(model, calib):
    """Inputs of every layer's o_proj and down_proj over all calibration tokens, captured by
    plain forward hooks on the whole model: per layer (tokens, channels) tensors."""
    adapter = get_adapter(model)
    caught = {("attn", i): [] for i in range(adapter.num_layers)} | {("mlp", i): [] for i in range(adapter.num_layers)}
    handles = []
    for i in range(adapter.num_layers):
        for kind, mod in (("attn", adapter.attn(i).o), ("mlp", adapter.mlp(i).out)):
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, key=(kind, i): caught[key].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for b in calib.batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in caught.items()}


def _close(a, b, rel=0.0, abs=0.0) -> bool:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return a.shape == b.shape and torch.allclose(a, b, rtol=rel, atol=abs)


def _setup():
    model = tiny_model("llama", head="causal-lm")
    calib = tiny_batches("llama", n_batches=2, batch=3, seq=12, labels="lm")
    return model, calib


def test_flap_scores_match_the_formula():
    model, calib = _setup()
    x = _dense_inputs(model, calib)
    adapter = get_adapter(model)
    res = prune(model, "flap-nobias", 0.7, calib=calib)  # scores come from the dense model
    dense = tiny_model("llama", head="causal-lm")
    a = get_adapter(dense)
    std = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    for i in range(a.num_layers):
        w_o, w_d = a.attn(i).o.weight.detach().double(), a.mlp(i).out.weight.detach().double()
        ch_a = (x["attn", i].var(0, unbiased=False) * w_o.pow(2).sum(0)) ** 2  # (4 q heads * 8,)
        ch_m = x["mlp", i].var(0, unbiased=False) * w_d.pow(2).sum(0)
        width = 2 * 8  # a KV group: 2 query heads of head_dim 8
        assert _close(res.scores.heads[i].double(), ch_a.reshape(-1, width).mean(1), rel=1e-4)
        assert _close(res.scores.neurons[i].double(), ch_m, rel=1e-4)
        h_std, n_std = res.scores.extra["flap_standardized"]
        assert _close(h_std[i], std(ch_a).reshape(-1, width).mean(1), rel=1e-4, abs=1e-6)
        assert _close(n_std[i], std(ch_m), rel=1e-4, abs=1e-6)
    assert adapter.widths() == res.report["widths_after"]


def test_flap_search_is_the_global_prefix_under_the_budget():
    from tshrink.cost import CostModel
    from tshrink_plugins.flap.flap_math import adaptive_search

    model = tiny_model("llama")
    cost = CostModel(get_adapter(model), 12)
    g = torch.Generator().manual_seed(1)
    heads = [torch.randn(2, generator=g) for _ in range(3)]
    neurons = [torch.randn(48, generator=g) for _ in range(3)]
    sel = adaptive_search(heads, neurons, cost, 0.6)
    assert cost.fraction(sel) <= 0.6
    kept = [h[k] for h, ks in zip(heads, sel.heads) for k in ks] + [n[k] for n, ks in zip(neurons, sel.neurons) for k in ks]
    dropped = ([h[k] for h, ks in zip(heads, sel.heads) for k in range(2) if k not in ks]
               + [n[k] for n, ks in zip(neurons, sel.neurons) for k in range(48) if k not in ks])
    assert min(kept) >= max(dropped)  # one threshold over heads and neurons of all layers


def test_flap_bias_compensation_adds_the_removed_channels_mean_and_round_trips(tmp_path):
    from tshrink.checkpoint import load_pruned, save_pruned

    model, calib = _setup()
    x = _dense_inputs(model, calib)
    dense = tiny_model("llama", head="causal-lm")
    a = get_adapter(dense)
    res = prune(model, "flap", 0.6, calib=calib)
    adapter = get_adapter(model)
    for i in range(a.num_layers):
        cols = adapter.unit_columns(i, res.selection.heads[i])
        gone_a = torch.tensor([c for c in range(a.attn(i).o.in_features) if c not in set(cols.tolist())], dtype=torch.long)
        gone_m = torch.tensor([c for c in range(48) if c not in set(res.selection.neurons[i])], dtype=torch.long)
        want_a = a.attn(i).o.weight.detach().double()[:, gone_a] @ x["attn", i].mean(0)[gone_a]
        want_m = a.mlp(i).out.weight.detach().double()[:, gone_m] @ x["mlp", i].mean(0)[gone_m]
        assert _close(adapter.attn(i).o.bias.double(), want_a, rel=1e-5, abs=1e-9)
        assert _close(adapter.mlp(i).out.bias.double(), want_m, rel=1e-5, abs=1e-9)
        assert want_m.abs().max() > 0 or gone_m.numel() == 0
    assert sum(48 - len(n) for n in res.selection.neurons) > 0  # something was removed and compensated
    assert dense.model.layers[0].self_attn.o_proj.bias is None  # Llama has no slot: the stage added it
    ids = calib.batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_pruned(model, tmp_path / "flap")
    back = load_pruned(tmp_path / "flap")
    assert back.model.layers[0].mlp.down_proj.bias is not None
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, before, atol=1e-5)


def test_wanda_sp_scores_match_the_formula():
    model, calib = _setup()
    x = _dense_inputs(model, calib)
    dense = tiny_model("llama", head="causal-lm")
    a = get_adapter(dense)
    res = prune(model, "wanda-sp", 0.7, calib=calib)
    sequences = 6
    for i in range(a.num_layers):
        w_o, w_d = a.attn(i).o.weight.detach().double(), a.mlp(i).out.weight.detach().double()
        norm_a = (x["attn", i].pow(2).sum(0) / sequences).sqrt()
        norm_m = (x["mlp", i].pow(2).sum(0) / sequences).sqrt()
        head = (w_o.abs().mean(0) * norm_a).reshape(2, 16).sum(1)
        assert _close(res.scores.heads[i].double(), head, rel=1e-4)
        assert _close(res.scores.neurons[i].double(), w_d.abs().mean(0) * norm_m, rel=1e-4)
    # the code's setting: the same kept fraction of heads and of neurons in every layer
    assert len(set(res.report["widths_after"]["neurons"])) == 1


@pytest.mark.parametrize("taylor", ["param_first", "param_mix"])
def test_llm_pruner_taylor_importance_matches_the_formula(taylor):
    model, calib = _setup()
    dense = tiny_model("llama", head="causal-lm")
    grads, acc = {}, {}  # the reference code: per-example backward passes; mean gradient, mean squared gradient
    for b in calib.batches:
        for r in range(b["input_ids"].shape[0]):
            dense.zero_grad()
            dense(input_ids=b["input_ids"][r:r + 1], labels=b["labels"][r:r + 1]).loss.backward()
            for name, p in dense.named_parameters():
                if p.grad is not None:
                    grads[name] = grads.get(name, 0) + p.grad.double() / 6
                    acc[name] = acc.get(name, 0) + p.grad.double() ** 2 / 6
    res = prune(model, "llm-pruner", 0.9, calib=calib, options={"llm_pruner_taylor": taylor,
                                                                "llm_pruner_skip_first": 1, "llm_pruner_skip_last": 1})

    def imp(name):
        w = dict(dense.named_parameters())[name].detach().double()
        s = w * grads[name]
        return (s - 0.5 * w * acc[name] * w if taylor == "param_mix" else s).abs()

    for i in range(3):
        p = f"model.layers.{i}."
        q, k, v, o = (imp(p + f"self_attn.{n}_proj.weight") for n in "qkvo")
        head = q.reshape(2, -1).sum(1) + k.reshape(2, -1).sum(1) + v.reshape(2, -1).sum(1) + o.t().reshape(2, -1).sum(1)
        neuron = (imp(p + "mlp.gate_proj.weight").sum(1) + imp(p + "mlp.up_proj.weight").sum(1)
                  + imp(p + "mlp.down_proj.weight").sum(0))
        assert _close(res.scores.heads[i].double(), head, rel=1e-3)
        assert _close(res.scores.neurons[i].double(), neuron, rel=1e-3)
    widths = res.report["widths_after"]
    assert widths["heads"][0] == 2 and widths["heads"][2] == 2 and widths["neurons"][0] == widths["neurons"][2] == 48
    assert widths["neurons"][1] < 48  # only the middle layer is pruned
    with pytest.raises(ValueError, match="leave none of the 3 layers"):
        prune(tiny_model("llama", head="causal-lm"), "llm-pruner", 0.9, calib=calib,
              options={"llm_pruner_skip_first": 2, "llm_pruner_skip_last": 1})


@pytest.mark.parametrize("recipe", ["score=flap,select=flap-search,correct=stat",
                                    "score=magnitude,select=global,correct=flap-bias",
                                    "score=wanda-sp,select=flap-search", "score=llm-pruner,select=global"])
def test_baseline_stages_compose_with_other_stages(recipe):
    model, calib = _setup()
    res = prune(model, recipe, 0.6, calib=calib)
    assert res.report["flops_kept"] <= 0.6 + 1e-9
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib.batches[0]["input_ids"]).logits).all()


def test_added_bias_save_reload_round_trip(tmp_path):
    from tshrink.checkpoint import load_pruned, read_manifest, save_pruned
    from tshrink.surgery import add_output_bias, output_bias_flags

    model = tiny_model("llama", head="causal-lm")
    adapter = get_adapter(model)
    add_output_bias(adapter, 1, "mlp", torch.arange(32.0))
    add_output_bias(adapter, 1, "mlp", torch.ones(32))  # a second correction adds to it
    add_output_bias(adapter, 2, "attn", torch.full((32,), -0.5))
    assert torch.equal(adapter.mlp(1).out.bias.detach(), torch.arange(32.0) + 1)
    with pytest.raises(ValueError, match=r"expected \(32,\)"):
        add_output_bias(adapter, 0, "attn", torch.zeros(5))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_pruned(model, tmp_path / "m")
    assert read_manifest(tmp_path / "m")["output_biases"] == {"attn": [False, False, True], "mlp": [False, True, False]}
    back = load_pruned(tmp_path / "m")
    assert output_bias_flags(get_adapter(back)) == output_bias_flags(adapter)
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, before, atol=1e-6)
