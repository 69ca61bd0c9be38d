"""The STAT plugin at model level: error curves, allocation, folds, sequential correction.

References: brute-force least-squares projections (error curves, folds), exhaustive search
(allocation), the dense model's outputs on HELD-OUT batches (end to end), magnitude pruning
at the same budget. Models are tiny Llama (GQA 4q/2kv) and BERT with low-rank structured
weights (correlated neurons and heads, as trained models have), so that what an ID exploits
exists and the comparisons are stable; seeds are fixed.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import tiny_batches
from tshrink.arch.families import get_adapter
from tshrink.pipeline import prune
from tshrink.units import Selection
from tshrink_plugins.stat.allocate import allocate_global, allocate_uniform, hull_gains
from tshrink_plugins.stat.collect import ColumnStats
from tshrink_plugins.stat.idecomp import (block_columns, id_from_gram, interpolative_decomposition,
                                          select_blocks, weighted_residuals)
from tshrink_plugins.stat.prune import StatConfig, fold_into, stat_correct, unit_scaling

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ls_residual(A: torch.Tensor, W: torch.Tensor, cols: list[int]) -> float:
    """Brute force: ||A W^T - P_K A W^T||_F with P_K the projector onto span(A[:, K])."""
    Y = A @ W.T
    if not cols:
        return float(torch.linalg.matrix_norm(Y))
    Q, s, _ = torch.linalg.svd(A[:, cols], full_matrices=False)
    Q = Q[:, s > 1e-10 * s[0]]
    return float(torch.linalg.matrix_norm(Y - Q @ (Q.T @ Y)))


def _correlated(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64) \
        + 0.05 * torch.randn(m, n, generator=g, dtype=F64)


# -- math helpers ---------------------------------------------------------------------------
def test_weighted_residuals_are_the_exact_fold_errors() -> None:
    A = _correlated(120, 10, 6, seed=0)
    W = torch.randn(7, 10, generator=_gen(1), dtype=F64)
    for d in (interpolative_decomposition(A, 0), id_from_gram(A.T @ A, 0)):
        err = weighted_residuals(d.factor, W)
        assert err.shape == (11,)
        for k in range(11):
            ref = _ls_residual(A, W, d.pivots[:k].tolist())
            assert float(err[k]) == pytest.approx(ref, rel=1e-6, abs=1e-6 * float(err[0]))
    sel = select_blocks(A.T @ A, 2, 0)
    err = weighted_residuals(sel.factor, W, sel.ends)
    for t in range(6):
        ref = _ls_residual(A, W, block_columns(sel.order[:t], 2).tolist())
        assert float(err[t]) == pytest.approx(ref, rel=1e-6, abs=1e-6 * float(err[0]))
    with pytest.raises(ValueError, match="factor must be a"):
        weighted_residuals(d.factor[:5], W)


def test_pivoted_cholesky_backends_agree() -> None:
    from tshrink_plugins.stat.idecomp import _pivoted_cholesky

    A = _correlated(300, 150, 40, seed=5)  # 150 columns: more than two torch panels
    A[:, 7] = A[:, 3]  # a repeated column
    G = A.T @ A
    (o1, L1), (o2, L2) = (_pivoted_cholesky(G, backend=b) for b in ("lapack", "torch"))
    assert o1.tolist() == o2.tolist() and o1.numel() == 150 - 1  # numerical rank: the duplicate drops
    torch.testing.assert_close(L1, L2, rtol=0, atol=1e-8 * float(L1.abs().max()))
    torch.testing.assert_close(L1 @ L1.T, G, rtol=0, atol=1e-9 * float(G.abs().max()))


def test_unit_scaling_reproduces_each_units_output_energy() -> None:
    g = _gen(2)
    W = torch.randn(12, 8, generator=g, dtype=F64)
    W[:, 5] = W[:, 4]  # a rank-deficient block (columns 4..5 of block 2 with bs=2)
    X = torch.randn(30, 8, generator=g, dtype=F64)
    for bs in (1, 2, 4):
        M, Mp = unit_scaling(W, bs)
        assert M.shape == (8 // bs, bs, bs)
        for u in range(8 // bs):
            c = slice(u * bs, (u + 1) * bs)
            assert float(torch.linalg.matrix_norm(X[:, c] @ M[u])) == pytest.approx(
                float(torch.linalg.matrix_norm(X[:, c] @ W[:, c].T)), rel=1e-9)
            torch.testing.assert_close(W[:, c] @ Mp[u] @ M[u], W[:, c], rtol=1e-9, atol=1e-9)


def test_hull_gains_and_allocation_against_exhaustive_search() -> None:
    e = torch.tensor([10.0, 9.0, 4.0, 3.5, 1.0, 0.0], dtype=F64)
    g = hull_gains(e)
    assert torch.all(g[1:] <= g[:-1] + 1e-12) and float(g.sum()) == pytest.approx(10.0)
    # the hull of (0,10),(1,9),(2,4),... is 10 -> 4 over 2 steps, 4 -> 1 over 2, 1 -> 0
    torch.testing.assert_close(g, torch.tensor([3.0, 3.0, 1.5, 1.5, 1.0], dtype=F64))
    # convex curves and equal unit costs: greedy == exhaustive optimum; never over budget
    curves = [torch.tensor(c, dtype=F64) for c in ([8, 4, 2, 1, 0], [5, 2, 0.5, 0], [9, 7, 5, 3, 1, 0])]
    for allowed in range(0, 15):
        w = allocate_global(curves, [1, 1, 1], float(allowed))
        best = min(sum(float(c[k]) for c, k in zip(curves, ks))
                   for ks in itertools.product(*(range(c.numel()) for c in curves)) if sum(ks) <= allowed)
        assert sum(w) <= allowed
        assert sum(float(c[k]) for c, k in zip(curves, w)) == pytest.approx(best)
    # unequal costs: within budget, cheap units fill what expensive ones leave
    w = allocate_global(curves, [5, 1, 2], 9.0)
    assert 5 * w[0] + w[1] + 2 * w[2] <= 9
    assert allocate_global([None, curves[1]], [5, 1], 2.0) == [None, 2]
    u = allocate_uniform([4, None, 10], [3, 7, 1], 12.0)
    assert u[1] is None and 3 * u[0] + u[2] <= 12 and u[2] == pytest.approx(10 * u[0] / 4, abs=1)


def test_fold_into_with_bias_fits_centred_data_better() -> None:
    A = _correlated(200, 12, 5, seed=4) + 3.0  # large mean
    lin = torch.nn.Linear(12, 6).double()
    Y = lin(A).detach()
    keep = torch.tensor([0, 3, 7])
    errs = {}
    for center in (False, True):
        stats = ColumnStats(12, device="cpu")
        stats.update(A[None], torch.ones(1, 200, dtype=torch.bool))
        l2 = torch.nn.Linear(12, 6).double()
        l2.load_state_dict(lin.state_dict())
        assert fold_into(l2, stats, keep, center, 0.0) is None
        with torch.no_grad():
            errs[center] = float(torch.linalg.matrix_norm(Y - A[:, keep] @ l2.weight[:, keep].T - l2.bias))
    # with an intercept the fit is a least-squares problem over a superset of regressors
    assert errs[True] < errs[False]
    X = torch.cat([A[:, keep], torch.ones(200, 1, dtype=F64)], 1)  # (200, |K|+1)
    ref = torch.linalg.matrix_norm(Y - X @ torch.linalg.lstsq(X, Y).solution)
    assert errs[True] == pytest.approx(float(ref), rel=1e-6)


# -- model helpers --------------------------------------------------------------------------
def structured(family: str, *, head: str = "base", seed: int = 0) -> torch.nn.Module:
    """A small random model with redundancy like trained transformers have: MLP neurons in
    clusters of near-duplicates (rows of gate/up = one of n/4 prototypes + 5 % noise) and
    value projections of low rank (heads whose outputs are correlated)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=97, max_position_embeddings=64, hidden_size=48, num_hidden_layers=3,
                  num_attention_heads=4, intermediate_size=96)
    if family == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, **common)
        auto = tf.AutoModelForCausalLM if head == "causal-lm" else tf.AutoModel
    else:
        cfg = tf.BertConfig(pad_token_id=1, **common)
        auto = tf.AutoModel
    model = auto.from_config(cfg)
    g = _gen(seed + 100)
    ad = get_adapter(model)
    with torch.no_grad():
        for layer in range(ad.num_layers):
            inputs = ad.mlp(layer).inputs
            n, d = inputs[0].weight.shape
            cluster = torch.randint(0, n // 4, (n,), generator=g)
            for lin in inputs:
                proto = torch.randn(n // 4, d, generator=g) / math.sqrt(d)
                lin.weight.copy_(proto[cluster] + 0.05 * torch.randn(n, d, generator=g) / math.sqrt(d))
            v = ad.attn(layer).v
            out, d = v.weight.shape
            low = torch.randn(out, 3, generator=g) @ torch.randn(3, d, generator=g) / math.sqrt(3 * d)
            v.weight.copy_(low + 0.05 * torch.randn(out, d, generator=g) / math.sqrt(d))
    model.eval()
    return model


def _batches(family: str, seed: int, n: int = 6):
    return tiny_batches(family, n_batches=n, batch=4, seq=16, seed=seed,
                        labels="lm" if family == "llama" else None)


def _hidden(model: torch.nn.Module, calib) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for b in calib.batches:
            h = get_adapter(model).backbone()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
            outs.append(h[b["attention_mask"].bool()])  # (real tokens, hidden)
    return torch.cat(outs)


def _rel_err(model: torch.nn.Module, ref: torch.Tensor, held_out) -> float:
    out = _hidden(model, held_out)
    return float(torch.linalg.matrix_norm(out - ref) / torch.linalg.matrix_norm(ref))


# -- single layer ---------------------------------------------------------------------------
def test_corrected_mlp_is_closer_to_dense_on_held_out_inputs() -> None:
    """Tiny Llama, MLP of layer 1 only: half the neurons kept, with and without the fold."""
    calib, held = _batches("llama", 0), _batches("llama", 1, n=2)
    dense = structured("llama")
    ad = get_adapter(dense)
    mlp = ad.layers()[1].mlp
    x_held = []
    with torch.no_grad():  # the MLP's held-out inputs and dense outputs
        h = mlp.register_forward_hook(lambda m, a, o: x_held.append((a[0], o)))
        _hidden(dense, held)
        h.remove()
    keep = list(range(0, 96, 2))  # an arbitrary (not data-driven) choice of 48 neurons
    sel = Selection.full(ad.head_counts(), ad.neuron_counts())
    sel.neurons[1] = keep

    def held_out_error(down: torch.Tensor, kept: list[int]) -> float:
        num = den = 0.0
        with torch.no_grad():
            for x, y in x_held:
                act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (batch, seq, 96)
                num += float((act[..., kept] @ down[:, kept].T - y).pow(2).sum())
                den += float(y.pow(2).sum())
        return math.sqrt(num / den)

    errs = {"plain": held_out_error(mlp.down_proj.weight, keep)}
    for repick in (False, True):
        model = structured("llama")
        out = stat_correct(get_adapter(model), calib, sel, StatConfig(repick=repick), device=torch.device("cpu"))
        assert len(out.neurons[1]) == 48 and (out.neurons[1] == keep) != repick
        assert out.neurons[0] == list(range(96)) and out.heads == sel.heads  # other units untouched
        errs[f"repick={repick}"] = held_out_error(get_adapter(model).mlp(1).out.weight, out.neurons[1])
    # measured: plain 0.70, folded (same neurons) 0.095, re-picked by the ID and folded 0.033
    assert errs["repick=False"] < 0.25 * errs["plain"], errs
    assert errs["repick=True"] < 0.6 * errs["repick=False"], errs


# -- end to end -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_stat_beats_magnitude_end_to_end_on_held_out(family: str) -> None:
    calib, held = _batches(family, 0), _batches(family, 1, n=2)
    ref = _hidden(structured(family), held)
    errs = {}
    for method in ("stat", "magnitude", "score=magnitude,select=global,correct=stat"):
        model = structured(family)
        res = prune(model, method, 0.5, calib=calib, seed=0)
        assert res.report["flops_kept"] <= 0.5 + 1e-9
        errs[method] = _rel_err(model, ref, held)
    # measured (llama / bert): stat 0.117 / 0.0032, magnitude 1.19 / 0.18, magnitude+stat 0.119 / 0.021
    assert errs["stat"] < 0.3 * errs["magnitude"], errs
    # the stages mix: STAT's correction after magnitude's selection beats magnitude alone
    assert errs["score=magnitude,select=global,correct=stat"] < 0.3 * errs["magnitude"], errs


def test_sketch_options_run_and_stay_close_to_exact() -> None:
    calib, held = _batches("llama", 0), _batches("llama", 1, n=2)
    ref = _hidden(structured("llama"), held)
    errs = {}
    for sketch in ("none", "gaussian", "countsketch"):  # measured: 0.116, 0.126, 0.125 (magnitude 1.19)
        model = structured("llama")
        # CountSketch's default 4k+10 rows reach the 96 columns here: give it 60
        opts = {"stat_sketch": sketch, **({"stat_sketch_size": 60} if sketch == "countsketch" else {})}
        res = prune(model, "stat", 0.5, calib=calib, options=opts, seed=0)
        assert res.report["flops_kept"] <= 0.5 + 1e-9
        assert res.report["stages"]["stat:score"]["route"].startswith("gram")  # scoring never sketches
        routes = [layer["mlp_route"] for layer in res.report["stages"]["stat:correct"]["layers"]]
        # a sketch only where it is shorter than the 96 columns and longer than the kept width
        assert all(r.startswith("gram") for r in routes) if sketch == "none" else any(r.startswith(sketch) for r in routes)
        errs[sketch] = _rel_err(model, ref, held)
    mag = structured("llama")
    prune(mag, "magnitude", 0.5, calib=calib)
    assert max(errs.values()) < 0.5 * _rel_err(mag, ref, held), errs
    assert errs["gaussian"] < 1.5 * errs["none"] and errs["countsketch"] < 1.5 * errs["none"], errs


def test_mlp_only_keeps_attention_and_falls_back_when_budget_too_small() -> None:
    calib = _batches("llama", 0, n=2)
    model = structured("llama")
    heads = get_adapter(model).head_counts()
    res = prune(model, "stat-mlp", 0.8, calib=calib)
    assert res.report["widths_after"]["heads"] == heads
    assert sum(res.report["widths_after"]["neurons"]) < 3 * 96
    assert res.report["flops_kept"] <= 0.8 + 1e-9
    # below the attention's own cost the budget still holds: heads go too, with a warning
    model = structured("llama")
    res = prune(model, "stat-mlp", 0.3, calib=calib)
    assert res.report["flops_kept"] <= 0.3 + 1e-9
    assert any("attention units are pruned" in w for w in res.report["stages"]["stat:select"]["warnings"])
    # uniform allocation: the same width in every layer
    model = structured("llama")
    res = prune(model, "stat-mlp", 0.8, calib=calib, options={"stat_allocation": "uniform"})
    assert len(set(res.report["widths_after"]["neurons"])) == 1


def _nan_hook(model: torch.nn.Module, layer: int, everything: bool):
    up = get_adapter(model).mlp(layer).inputs[-1]

    def hook(mod, args, out):
        out = out.clone()
        if everything:
            out[:] = float("nan")
        else:
            out[0, 3] = float("nan")  # one token of one sequence
        return out

    return up.register_forward_hook(hook)


def test_nan_activations_do_not_corrupt_weights() -> None:
    calib, held = _batches("llama", 0, n=3), _batches("llama", 1, n=1)
    # a few NaN tokens: dropped, reported, the rest of the data still corrects
    model = structured("llama")
    h = _nan_hook(model, 1, everything=False)
    res = prune(model, "stat", 0.6, calib=calib)
    h.remove()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(_hidden(model, held)).all()
    warn = res.report["stages"]["stat:correct"]["warnings"]
    assert any("NaN/inf" in w for w in warn), warn
    # every activation of a layer NaN: the score stage refuses clearly ...
    model = structured("llama")
    h = _nan_hook(model, 1, everything=True)
    with pytest.raises(ValueError, match="no calibration token has finite"):
        prune(model, "stat", 0.6, calib=calib)
    # ... and the correct stage keeps the selection, skips the correction, changes no weight there
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune(model, "score=magnitude,select=global,correct=stat", 0.6, calib=calib)
    h.remove()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(_hidden(model, held)).all()
    warn = res.report["stages"]["stat:correct"]["warnings"]
    assert any("layer 1 MLP: no finite calibration activations" in w for w in warn), warn
    down = get_adapter(model).mlp(2).out.weight  # layer 2 only sees NaN inputs: uncorrected, only sliced
    kept = res.selection.neurons[2]
    torch.testing.assert_close(down, before["layers.2.mlp.down_proj.weight"][:, kept])


def test_non_sequential_and_no_repick_variants_meet_the_budget() -> None:
    calib, held = _batches("bert", 0, n=3), _batches("bert", 1, n=1)
    ref = _hidden(structured("bert"), held)
    errs = {}
    for opts in ({"stat_sequential": "none"}, {"stat_sequential": "sublayer"}, {"stat_repick": False},
                 {"stat_center": False, "stat_error_norm": "none"}):
        model = structured("bert")
        res = prune(model, "stat", 0.5, calib=calib, options=opts)
        assert res.report["flops_kept"] <= 0.5 + 1e-9
        errs[str(opts)] = _rel_err(model, ref, held)
    mag = structured("bert")
    prune(mag, "magnitude", 0.5, calib=calib)
    assert max(errs.values()) < 0.3 * _rel_err(mag, ref, held), errs
    with pytest.raises(ValueError, match="stat_sketch"):
        prune(structured("bert"), "stat", 0.5, calib=calib, options={"stat_sketch": "srht"})


def test_allocate_needs_stat_curves() -> None:
    calib = _batches("llama", 0, n=1)
    with pytest.raises(ValueError, match="needs the error curves of score stage 'stat'"):
        prune(structured("llama"), "score=magnitude,select=stat-allocate", 0.5, calib=calib)


def test_min_width_floor_holds_in_every_layer() -> None:
    calib = _batches("llama", 0)
    free = structured("llama")
    r0 = prune(free, "stat", 0.35, calib=calib)
    floored = structured("llama")
    r1 = prune(floored, "stat", 0.35, calib=calib, options={"stat_min_width": 0.25})
    n = free.config.intermediate_size
    assert min(r1.report["widths_after"]["neurons"]) >= int(0.25 * n)
    assert r1.report["flops_kept"] <= 0.35 + 1e-9 and r0.report["flops_kept"] <= 0.35 + 1e-9
    with pytest.raises(ValueError, match="stat_min_width"):
        prune(structured("llama"), "stat", 0.35, calib=calib, options={"stat_min_width": 1.5})

def test_select_blocks_in_a_given_order_gives_that_orders_fold_errors() -> None:
    A = _correlated(120, 12, 5, seed=3)
    W = torch.randn(7, 12, generator=_gen(4), dtype=F64)
    order = [4, 0, 5, 2, 1, 3]
    sel = select_blocks(A.T @ A, 2, 2, order=order)
    assert sel.order.tolist() == order and sel.blocks.tolist() == [4, 0]
    err = weighted_residuals(sel.factor, W, sel.ends)
    for t in range(7):
        ref = _ls_residual(A, W, block_columns(torch.tensor(order[:t], dtype=torch.long), 2).tolist())
        assert float(err[t]) == pytest.approx(ref, rel=1e-6, abs=1e-6 * float(err[0]))
    with pytest.raises(ValueError, match="permutation of the 6 blocks"):
        select_blocks(A.T @ A, 2, 2, order=[0, 1, 2])
    with pytest.raises(ValueError, match="must not repeat"):
        select_blocks(A.T @ A, 2, 2, order=[0, 0, 1, 2, 3, 4])


def test_trace_head_rule_is_the_prototypes_formula() -> None:
    """Hand computation: M[h, g] = tr(G_hg) ||W_h||_F ||W_g||_F, then greedy pivoted Cholesky
    (largest remaining Schur diagonal first), computed here with explicit loops."""
    from tshrink_plugins.stat.prune import trace_order

    bs, nb = 3, 5
    A = _correlated(200, bs * nb, 6, seed=7)
    W = torch.randn(4, bs * nb, generator=_gen(8), dtype=F64)
    G = A.T @ A
    w = [float(W[:, h * bs:(h + 1) * bs].norm()) for h in range(nb)]
    M = torch.tensor([[float(torch.trace(G[h * bs:(h + 1) * bs, g * bs:(g + 1) * bs])) * w[h] * w[g]
                       for g in range(nb)] for h in range(nb)], dtype=F64)
    order, S = [], M.clone()
    for _ in range(nb):
        p = max((i for i in range(nb) if i not in order), key=lambda i: float(S[i, i]))
        order.append(p)
        S = S - torch.outer(S[:, p], S[p, :]) / S[p, p]
    assert trace_order(G, W, bs).tolist() == order


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_trace_head_rule_runs_end_to_end(family: str) -> None:
    calib, held = _batches(family, 0, n=3), _batches(family, 1, n=1)
    ref = _hidden(structured(family), held)
    errs = {}
    for method in ("stat", "stat-uniform"):
        model = structured(family)
        res = prune(model, method, 0.5, calib=calib, options={"stat_head_rule": "trace"})
        assert res.report["flops_kept"] <= 0.5 + 1e-9
        assert res.report["options"]["stat_head_rule"] == "trace"
        errs[method] = _rel_err(model, ref, held)
    mag = structured(family)
    prune(mag, "magnitude", 0.5, calib=calib)
    assert max(errs.values()) < 0.5 * _rel_err(mag, ref, held), errs
    with pytest.raises(ValueError, match="stat_head_rule"):
        prune(structured(family), "stat", 0.5, calib=calib, options={"stat_head_rule": "qr"})
