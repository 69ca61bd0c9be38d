"""Latency-aware Fisher search: piecewise fit, budget always met (by the table), the public
code's shrinking budget not reproduced, unmeetable budgets refused, per-device tables."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.pipeline import prune
from tshrink_plugins.fisher import latency_table as LT
from tshrink_plugins.fisher.latency_search import Piecewise, estimate, fit_piecewise, search_latency


def _table(pw: Piecewise, n: int, noise: float = 0.0, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return [pw(k) + noise * float(torch.rand(1, generator=g)) for k in range(1, n + 1)]


def test_fit_recovers_an_exact_piecewise_table():
    pw = Piecewise(threshold=4, c=2.0, slope=0.25)
    fit = fit_piecewise(_table(pw, 12))
    assert fit.threshold == 4 and fit.c == pytest.approx(2.0) and fit.slope == pytest.approx(0.25)
    flat = fit_piecewise([1.0] * 6)
    assert flat.slope == 0.0 and flat.c == pytest.approx(1.0)
    with pytest.raises(ValueError, match="latency table"):
        fit_piecewise([])


def _imps(L, H, N, seed):
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(H, generator=g, dtype=torch.float64) for _ in range(L)],
            [torch.rand(N, generator=g, dtype=torch.float64) for _ in range(L)])


@pytest.mark.parametrize("seed", range(6))
def test_search_never_exceeds_its_budget_by_the_table(seed):
    L, H, N = 4, 6, 40
    heads, neurons = _imps(L, H, N, seed)
    # noisy, not exactly piecewise-linear tables: the fit under-estimates some entries
    h_lut = _table(Piecewise(2, 1.0, 0.3), H, noise=0.4, seed=seed)
    n_lut = _table(Piecewise(8, 0.8, 0.05), N, noise=0.3, seed=seed + 10)
    base = 0.2
    dense = estimate(h_lut, n_lut, base, [H] * L, [N] * L)
    last = -1.0
    for frac in (0.15, 0.3, 0.5, 0.7, 0.9, 1.0):
        hm, nm, info = search_latency(heads, neurons, h_lut, n_lut, base, frac * dense)
        est = estimate(h_lut, n_lut, base, [int(m.sum()) for m in hm], [int(m.sum()) for m in nm])
        assert est <= frac * dense * (1 + 1e-9) and info["estimated_ms"] == pytest.approx(est)
        kept = sum(float(x[m].sum()) for x, m in zip(heads + neurons, hm + nm))
        assert kept >= last - 1e-9  # more budget never keeps less importance
        last = kept
    assert all(m.all() for m in hm + nm)  # the whole budget: everything kept


def test_the_budget_does_not_shrink_across_candidates():
    """The public code subtracts each candidate's fixed cost from max_latency for good; here a
    budget met only after removing four of six sub-layers is still met, with the best choice."""
    L, H, N = 3, 4, 4
    heads, neurons = _imps(L, H, N, 3)
    h_lut = [10.0] + [10.0 + k for k in range(1, H)]  # c = 10, slope 1 after the first unit
    n_lut = [10.0] + [10.0 + k for k in range(1, N)]
    hm, nm, info = search_latency(heads, neurons, h_lut, n_lut, 0.0, 25.0)
    kept_sub = sum(bool(m.any()) for m in hm + nm)
    assert kept_sub == 2 and info["estimated_ms"] <= 25.0  # 2 sub-layers at 10 each + 5 extra units
    assert sum(int(m.sum()) for m in hm + nm) == 2 + 5
    # replay of the public code's loop: its budget is gone before the first feasible candidate
    budget, feasible = 25.0, 0
    for a in range(L):
        for f in range(L):
            budget = budget - ((L - a) * 10.0 + (L - f) * 10.0)
            feasible += budget >= 0
    assert feasible == 0


def test_an_unmeetable_budget_is_refused_with_the_floor():
    heads, neurons = _imps(2, 2, 3, 0)
    with pytest.raises(ValueError, match="cannot be met.*2 ms"):
        search_latency(heads, neurons, [1.0, 1.5], [1.0, 1.2, 1.4], 1.0, 1.5)


def _fake_timer(fn, min_run_time):
    """Deterministic 'milliseconds': 1 + parameters of the block / 1000."""
    return 1.0 + sum(p.numel() for p in fn.block.parameters()) / 1000.0


def test_tables_are_measured_cached_and_rebuilt_or_refused_for_another_device(tmp_path, monkeypatch):
    monkeypatch.setenv("TSHRINK_LATENCY_CACHE", str(tmp_path))
    model = tiny_model("bert", "sequence-classification")
    adapter = get_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def timer(fn, t):
        calls.append(1)
        return _fake_timer(fn, t)

    tables, src = LT.load_or_measure(adapter, batch=2, seq=8, device="cpu", points=5, timer=timer)
    assert src["status"] == "measured" and len(tables["heads"]) == 4 and len(tables["neurons"]) == 48
    assert all(b >= a for a, b in zip(tables["heads"], tables["heads"][1:])) and tables["heads"][0] > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert adapter.head_counts() == [4, 4, 4]
    n = len(calls)
    again, src2 = LT.load_or_measure(adapter, batch=2, seq=8, device="cpu", points=5, timer=timer)
    assert src2["status"] == "cached" and again == tables and len(calls) == n
    other = dict(LT.device_fingerprint("cpu"), name="some other CPU")
    file = LT.cache_path(LT.shape_key(adapter, 2, 8))
    data = json.loads(file.read_text())
    data["device"] = other
    file.write_text(json.dumps(data))
    _, src3 = LT.load_or_measure(adapter, batch=2, seq=8, device="cpu", points=5, timer=timer)
    assert src3["status"].startswith("rebuilt") and "some other CPU" in src3["status"] and len(calls) > n
    given = tmp_path / "given.json"
    given.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="measured on .*some other CPU"):
        LT.load_or_measure(adapter, batch=2, seq=8, device="cpu", path=str(given))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fisher_latency_end_to_end_meets_the_latency_budget(tmp_path, monkeypatch, family):
    monkeypatch.setenv("TSHRINK_LATENCY_CACHE", str(tmp_path))
    monkeypatch.setattr(LT, "_time", _fake_timer)
    head = "sequence-classification" if family == "bert" else "causal-lm"
    model = tiny_model(family, head)
    calib = tiny_batches(family, labels="class" if family == "bert" else "lm")
    res = prune(model, "fisher-latency", 0.6, calib=calib, options={"fisher_latency_batch": 2,
                                                                     "fisher_latency_points": 4})
    rep = res.report["stages"]["fisher-latency"]
    assert rep["budget_kind"] == "latency" and rep["latency_kept_estimated"] <= 0.6 + 1e-9
    assert rep["table"]["status"] == "measured" and res.report["stages"]["fisher-tune"]["teacher"] == "search-sqrt"
    model = tiny_model(family, head)
    with pytest.raises(ValueError, match="cannot be met"):
        prune(model, "fisher-latency", 0.01, calib=calib, options={"fisher_latency_batch": 2,
                                                                    "fisher_latency_points": 4})
