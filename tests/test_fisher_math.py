"""Numerical core of the Fisher-mask method: importance, search, rearrangement, tuning."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tshrink_plugins.fisher.fisher_math import fisher_importance, fisher_loss_increase
from tshrink_plugins.fisher.rearrange import rearrange_mask
from tshrink_plugins.fisher.search import search_mask
from tshrink_plugins.fisher.tuning import tune_scales, tune_scales_gram

D = torch.float64


# ----------------------------------------------------------------------------- importance
def _tiny_model_loss(mask: torch.Tensor, acts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss of one batch of a masked "layer": 0.5 * sum_rows (sum_u m_u tanh(acts_u) - y)^2."""
    out = (torch.tanh(acts) * mask).sum(-1)  # (rows,)
    return 0.5 * (out - y).pow(2).sum()


def _tiny_problem(batches: int = 5, rows: int = 3, units: int = 4):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(batches, rows, units, generator=g, dtype=D)
    y = torch.randn(batches, rows, generator=g, dtype=D)
    return acts, y


def test_fisher_importance_matches_autograd_and_finite_differences():
    acts, y = _tiny_problem()
    grads = []
    for a, t in zip(acts, y):
        mask = torch.ones(a.shape[-1], dtype=D, requires_grad=True)
        _tiny_model_loss(mask, a, t).backward()
        grads.append(mask.grad)
    grads = torch.stack(grads)  # (batches, units)

    # analytic gradient at m = 1: sum_rows (sum_u tanh a_u - y) * tanh a_u
    th = torch.tanh(acts)
    analytic = ((th.sum(-1) - y).unsqueeze(-1) * th).sum(1)  # (batches, units)
    torch.testing.assert_close(grads, analytic)

    # central finite differences of the same loss
    eps = 1e-6
    fd = torch.zeros_like(grads)
    for b in range(acts.shape[0]):
        for u in range(acts.shape[-1]):
            e = torch.zeros(acts.shape[-1], dtype=D)
            e[u] = eps
            one = torch.ones(acts.shape[-1], dtype=D)
            fd[b, u] = (_tiny_model_loss(one + e, acts[b], y[b]) - _tiny_model_loss(one - e, acts[b], y[b])) / (2 * eps)
    torch.testing.assert_close(grads, fd, rtol=1e-6, atol=1e-8)

    expected = torch.tensor([sum(float(grads[b, u]) ** 2 for b in range(grads.shape[0])) for u in range(grads.shape[1])], dtype=D)
    torch.testing.assert_close(fisher_importance(grads), expected)


def test_fisher_importance_keeps_unit_shape_and_upcasts_half():
    grads = torch.tensor([[[1.0, -2.0]], [[3.0, 0.5]]])  # (batches=2, L=1, H=2)
    assert torch.equal(fisher_importance(grads), torch.tensor([[10.0, 4.25]]))
    half = fisher_importance(grads.half())
    assert half.dtype == torch.float32 and torch.equal(half, torch.tensor([[10.0, 4.25]]))
    with pytest.raises(ValueError, match="batches"):
        fisher_importance(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        fisher_importance(torch.tensor([[float("nan")]]))


def test_fisher_loss_increase_is_the_quadratic_form():
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(7, 5, generator=g, dtype=D)
    fisher = grads.T @ grads  # (U, U) sum_b g_b g_b^T
    for mask in (torch.tensor([True, False, True, False, False]), torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0], dtype=D)):
        removed = 1 - mask.to(D)
        torch.testing.assert_close(fisher_loss_increase(mask, grads), 0.5 * removed @ fisher @ removed)
    assert fisher_loss_increase(torch.ones(5, dtype=torch.bool), grads) == 0
    with pytest.raises(ValueError, match="length U=5"):
        fisher_loss_increase(torch.ones(4, dtype=torch.bool), grads)


# ----------------------------------------------------------------------------- search
def _all_subsets(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=D)  # (2^n, n)


def _cost(h_mask, n_mask, h_cost_units, n_cost_units) -> float:
    return float(h_mask.reshape(-1).to(D) @ h_cost_units + n_mask.reshape(-1).to(D) @ n_cost_units)


def _value(h_mask, n_mask, h_imp, n_imp) -> float:
    return float(h_imp.reshape(-1)[h_mask.reshape(-1)].sum() + n_imp.reshape(-1)[n_mask.reshape(-1)].sum())


def test_search_hand_checked_case():
    # heads ranked 5, 3, 1, 0.5 (cost 3 each); neurons ranked 2, 1.8, 1.5, 0.2, 0.1, 0.05 (cost 1); budget 7
    # h=0: 6 neurons -> 5.65;  h=1: 4 neurons -> 5 + 5.5 = 10.5;  h=2: 1 neuron -> 8 + 2 = 10;  h=3: over budget
    head_imp = torch.tensor([[5.0, 1.0], [3.0, 0.5]], dtype=D)
    neuron_imp = torch.tensor([[2.0, 0.1, 1.5], [0.2, 1.8, 0.05]], dtype=D)
    hm, nm = search_mask(head_imp, neuron_imp, 3.0, 1.0, 7.0)
    assert hm.dtype == torch.bool and hm.shape == (2, 2) and nm.shape == (2, 3)
    assert hm.tolist() == [[True, False], [False, False]]
    assert nm.tolist() == [[True, False, True], [True, True, False]]
    # the brute-force optimum over all 2^10 subsets is the same value
    subsets = _all_subsets(10)
    imp = torch.cat([head_imp.reshape(-1), neuron_imp.reshape(-1)])
    cost = torch.tensor([3.0] * 4 + [1.0] * 6, dtype=D)
    best = (subsets @ imp)[subsets @ cost <= 7.0].max()
    assert _value(hm, nm, head_imp, neuron_imp) == pytest.approx(float(best)) == pytest.approx(10.5)


def test_search_uniform_costs_is_the_exact_knapsack_optimum():
    g = torch.Generator().manual_seed(2)
    subsets = _all_subsets(4 + 6)
    for _ in range(25):
        head_imp = torch.rand(2, 2, generator=g, dtype=D) * 3
        neuron_imp = torch.rand(2, 3, generator=g, dtype=D)
        h_cost, n_cost = float(torch.randint(2, 6, (1,), generator=g)), float(torch.randint(1, 3, (1,), generator=g))
        budget = float(torch.rand(1, generator=g, dtype=D)) * (4 * h_cost + 6 * n_cost)
        hm, nm = search_mask(head_imp, neuron_imp, h_cost, n_cost, budget)
        unit_cost = torch.tensor([h_cost] * 4 + [n_cost] * 6, dtype=D)
        assert _cost(hm, nm, unit_cost[:4], unit_cost[4:]) <= budget
        imp = torch.cat([head_imp.reshape(-1), neuron_imp.reshape(-1)])
        best = (subsets @ imp)[subsets @ unit_cost <= budget].max()
        assert _value(hm, nm, head_imp, neuron_imp) == pytest.approx(float(best))


def _prefix_reference(h_imp, n_imp, h_cost_units, n_cost_units, budget) -> float:
    """Best value over all (head prefix, neuron prefix) pairs in importance-per-cost order, by enumeration."""
    h_order = sorted(range(len(h_imp)), key=lambda i: -float(h_imp[i] / h_cost_units[i]))
    n_order = sorted(range(len(n_imp)), key=lambda i: -float(n_imp[i] / n_cost_units[i]))
    best = -1.0
    for h in range(len(h_order) + 1):
        for n in range(len(n_order) + 1):
            cost = sum(float(h_cost_units[i]) for i in h_order[:h]) + sum(float(n_cost_units[i]) for i in n_order[:n])
            if cost <= budget:
                best = max(best, sum(float(h_imp[i]) for i in h_order[:h]) + sum(float(n_imp[i]) for i in n_order[:n]))
    return best


def test_search_per_layer_costs_never_exceeds_budget_and_is_best_prefix_pair():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        head_imp = torch.rand(3, 2, generator=g, dtype=D)
        neuron_imp = torch.rand(3, 4, generator=g, dtype=D)
        h_cost = torch.randint(2, 9, (3,), generator=g).to(D)
        n_cost = torch.randint(1, 4, (3,), generator=g).to(D)
        h_units, n_units = h_cost.repeat_interleave(2), n_cost.repeat_interleave(4)
        budget = float(torch.rand(1, generator=g, dtype=D)) * float(h_units.sum() + n_units.sum())
        hm, nm = search_mask(head_imp, neuron_imp, h_cost, n_cost, budget)
        assert _cost(hm, nm, h_units, n_units) <= budget
        ref = _prefix_reference(head_imp.reshape(-1), neuron_imp.reshape(-1), h_units, n_units, budget)
        assert _value(hm, nm, head_imp, neuron_imp) == pytest.approx(ref)


def test_search_ragged_layers_and_extreme_budgets():
    g = torch.Generator().manual_seed(4)
    head_imp = [torch.rand(3, generator=g, dtype=D), torch.rand(1, generator=g, dtype=D)]
    neuron_imp = [torch.rand(2, generator=g, dtype=D), torch.rand(4, generator=g, dtype=D)]
    h_cost, n_cost = [4.0, 6.0], [1.0, 2.0]
    h_units = torch.tensor([4.0, 4.0, 4.0, 6.0], dtype=D)
    n_units = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=D)
    for budget in (0.0, 5.0, 13.0, 22.0, 100.0):
        hm, nm = search_mask(head_imp, neuron_imp, h_cost, n_cost, budget)
        assert [m.shape[0] for m in hm] == [3, 1] and [m.shape[0] for m in nm] == [2, 4]
        hm, nm = torch.cat(hm), torch.cat(nm)
        assert _cost(hm, nm, h_units, n_units) <= budget
        ref = _prefix_reference(torch.cat(head_imp), torch.cat(neuron_imp), h_units, n_units, budget)
        assert _value(hm, nm, torch.cat(head_imp), torch.cat(neuron_imp)) == pytest.approx(ref)
        if budget == 0.0:
            assert not hm.any() and not nm.any()
        if budget == 100.0:
            assert hm.all() and nm.all()
    # a ragged list of equal-length layers gives the same masks as the dense tensor
    dense_h, dense_n = torch.rand(2, 3, generator=g, dtype=D), torch.rand(2, 5, generator=g, dtype=D)
    hm_d, nm_d = search_mask(dense_h, dense_n, 3.0, 1.0, 9.5)
    hm_r, nm_r = search_mask(list(dense_h), list(dense_n), 3.0, 1.0, 9.5)
    assert torch.equal(torch.stack(hm_r), hm_d) and torch.equal(torch.stack(nm_r), nm_d)


def test_search_rejects_bad_input():
    h, n = torch.ones(2, 2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="budget"):
        search_mask(h, n, 1.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="budget"):
        search_mask(h, n, 1.0, 1.0, float("nan"))
    with pytest.raises(ValueError, match="head_imp"):
        search_mask(torch.ones(2, 2, 2), n, 1.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="neuron_imp"):
        search_mask(h, -n, 1.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="one value per layer"):
        search_mask(h, n, [1.0, 2.0, 3.0], 1.0, 3.0)
    with pytest.raises(ValueError, match="neuron_cost must be finite and > 0"):
        search_mask(h, n, 1.0, 0.0, 3.0)


# ----------------------------------------------------------------------------- rearrangement
def test_rearrange_finds_the_optimum_when_gradients_cancel():
    # units a, b: large diagonal Fisher but opposite gradients; c, d: small but aligned.
    # Pruning the two least important (c, d) costs 1/2 * ||g_c + g_d||^2 = 0.5;
    # pruning a and b together costs only 1/2 * ||g_a + g_b||^2 = 0.00125.
    grads = torch.tensor([[1.0, -1.0, -0.5, -0.5], [0.0, 0.05, 0.0, 0.0]], dtype=D)  # (batches=2, U=4)
    start = torch.tensor([True, True, False, False])  # the search's mask: lowest diagonal pruned
    out = rearrange_mask(start, grads)
    best = min(
        (torch.tensor([i not in pair for i in range(4)]) for pair in itertools.combinations(range(4), 2)),
        key=lambda m: float(fisher_loss_increase(m, grads)),
    )
    assert out.tolist() == best.tolist() == [False, False, True, True]
    assert float(fisher_loss_increase(out, grads)) == pytest.approx(0.00125)
    assert float(fisher_loss_increase(start, grads)) == pytest.approx(0.5)


def test_rearrange_never_increases_the_estimate_and_keeps_the_count():
    g = torch.Generator().manual_seed(5)
    for trial in range(30):
        units = 6 + trial % 5
        base = torch.randn(4, 1, generator=g, dtype=D)
        grads = base * torch.randn(1, units, generator=g, dtype=D) + 0.3 * torch.randn(4, units, generator=g, dtype=D)
        mask = torch.randperm(units, generator=g) < (1 + trial % (units - 1))  # random, not importance-ordered
        out = rearrange_mask(mask, grads)
        assert out.dtype == torch.bool and int(out.sum()) == int(mask.sum())
        assert float(fisher_loss_increase(out, grads)) <= float(fisher_loss_increase(mask, grads)) + 1e-12


def test_rearrange_edge_cases_and_float_masks():
    grads = torch.randn(3, 4, dtype=D)
    for mask in (torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)):
        out = rearrange_mask(mask, grads)
        assert torch.equal(out, mask) and out is not mask
    grads = torch.tensor([[1.0, -1.0, -0.5, -0.5], [0.0, 0.05, 0.0, 0.0]])
    out = rearrange_mask(torch.tensor([1.0, 1.0, 0.0, 0.0]), grads)
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="only 0 and 1"):
        rearrange_mask(torch.tensor([1.0, 0.5, 0.0, 0.0]), grads)
    with pytest.raises(ValueError, match="length U=4"):
        rearrange_mask(torch.ones(3, dtype=torch.bool), grads)


# ----------------------------------------------------------------------------- tuning
def _tuning_problem(m: int = 60, k: int = 4, seed: int = 6):
    g = torch.Generator().manual_seed(seed)
    contrib = torch.randn(m, k, generator=g, dtype=D)
    true_scales = 1 + 0.3 * torch.randn(k, generator=g, dtype=D)
    target = contrib @ true_scales + 0.05 * torch.randn(m, generator=g, dtype=D)
    return contrib, target


def _damped_reference(contrib: torch.Tensor, target: torch.Tensor, damp: float) -> np.ndarray:
    """argmin ||C s - t||^2 + lam ||s - 1||^2 as an ordinary stacked least-squares problem."""
    c, t = contrib.numpy(), target.numpy()
    k = c.shape[1]
    lam = damp**2 * (c * c).sum() / k
    a = np.vstack([c, np.sqrt(lam) * np.eye(k)])
    b = np.concatenate([t, np.sqrt(lam) * np.ones(k)])
    return np.linalg.lstsq(a, b, rcond=None)[0]


@pytest.mark.parametrize("damp", [0.0, 1e-2, 0.5])
def test_tuning_matches_reference_and_gram_form(damp):
    contrib, target = _tuning_problem()
    scales, ok = tune_scales(contrib, target, damp=damp)
    scales_g, ok_g = tune_scales_gram(contrib.T @ contrib, contrib.T @ target, damp=damp)
    assert ok and ok_g
    ref = torch.from_numpy(_damped_reference(contrib, target, damp))
    torch.testing.assert_close(scales, ref, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(scales_g, ref, rtol=1e-9, atol=1e-10)
    ones = torch.ones(contrib.shape[1], dtype=D)
    assert (contrib @ scales - target).norm() < 0.5 * (contrib @ ones - target).norm()


def test_tuning_streaming_gram_and_float32():
    contrib, target = _tuning_problem(m=90, k=3, seed=7)
    ctc = sum(c.T @ c for c in contrib.split(30))  # accumulated over token chunks
    ctt = sum(c.T @ t for c, t in zip(contrib.split(30), target.split(30)))
    s_l, _ = tune_scales(contrib.float(), target.float())
    s_g, _ = tune_scales_gram(ctc.float(), ctt.float())
    assert s_l.dtype == s_g.dtype == torch.float32
    torch.testing.assert_close(s_l, s_g, rtol=1e-4, atol=1e-5)


def test_tuning_unpruned_layer_keeps_ones():
    contrib, _ = _tuning_problem()
    for scales, ok in (tune_scales(contrib, contrib.sum(1)), tune_scales_gram(contrib.T @ contrib, contrib.T @ contrib.sum(1))):
        assert ok
        torch.testing.assert_close(scales, torch.ones(4, dtype=D))


def test_tuning_rejects_out_of_bounds_and_ill_conditioned():
    contrib, _ = _tuning_problem()
    far = contrib @ torch.full((4,), 20.0, dtype=D)  # needs scales ~20, outside the default (-10, 10)
    for scales, ok in (tune_scales(contrib, far), tune_scales_gram(contrib.T @ contrib, contrib.T @ far)):
        assert not ok and torch.equal(scales, torch.ones(4, dtype=D))
    assert tune_scales(contrib, far, bounds=(-30.0, 30.0))[1]

    # two nearly collinear units whose tiny difference must explain part of the target
    g = torch.Generator().manual_seed(8)
    c = torch.randn(50, 3, generator=g, dtype=D)
    c[:, 2] = c[:, 1] + 1e-7 * torch.randn(50, generator=g, dtype=D)
    t = c.sum(1) + 0.1 * torch.randn(50, generator=g, dtype=D)
    for scales, ok in (tune_scales(c, t, damp=0.0), tune_scales_gram(c.T @ c, c.T @ t, damp=0.0)):
        assert not ok and torch.equal(scales, torch.ones(3, dtype=D))
    s_l, ok_l = tune_scales(c, t)  # default damping makes it well posed
    s_g, ok_g = tune_scales_gram(c.T @ c, c.T @ t)
    assert ok_l and ok_g
    torch.testing.assert_close(s_l, s_g, rtol=1e-6, atol=1e-7)

    # exactly singular normal equations without damping; all-zero contributions
    c[:, 2] = c[:, 1]
    scales, ok = tune_scales_gram(c.T @ c, c.T @ t, damp=0.0)
    assert not ok and torch.equal(scales, torch.ones(3, dtype=D))
    zero = torch.zeros(10, 2, dtype=D)
    assert not tune_scales(zero, torch.ones(10, dtype=D))[1]
    assert not tune_scales_gram(zero.T @ zero, torch.zeros(2, dtype=D))[1]


def test_tuning_empty_and_bad_input():
    scales, ok = tune_scales(torch.zeros(5, 0), torch.zeros(5))
    assert ok and scales.shape == (0,)
    contrib, target = _tuning_problem()
    with pytest.raises(ValueError, match="bounds"):
        tune_scales(contrib, target, bounds=(2.0, 3.0))
    with pytest.raises(ValueError, match="damp"):
        tune_scales(contrib, target, damp=-1.0)
    with pytest.raises(ValueError, match=r"target must have shape \(60,\)"):
        tune_scales(contrib, target[:-1])
    with pytest.raises(ValueError, match="square"):
        tune_scales_gram(contrib, target)
    with pytest.raises(ValueError, match="symmetric"):
        tune_scales_gram(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.zeros(2))
