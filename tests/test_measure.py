"""Latency protocol (interleaving, thread pinning, spread, noise flag) with fake timers,
and the FLOPs pricing length of `harness compare`. No timing assertions."""
from __future__ import annotations

import json

import pytest
import torch

from _harness_fixtures import glue_dir, tiny_bert_dir
from conftest import tiny_model
from tshrink_harness.cli import main
from tshrink_harness.leaderboard import speedup_cell
from tshrink_harness.measure import interleaved_latency, latency_batch, latency_record, speedup_flag
from tshrink_harness.run import parse_pricing, pricing_length


class FakeClock:
    """Stands in for torch.utils.benchmark: records which model is timed, returns set times."""

    def __init__(self, seconds: dict[int, list[float]]):
        self.seconds, self.calls, self.threads = seconds, [], []

    def __call__(self, fn, *, min_run_time, threads):
        self.calls.append(id(fn))
        self.threads.append((threads, torch.get_num_threads()))
        key = self.order[id(fn)]
        return [self.seconds[key].pop(0)]


def _two_models():
    a, b = tiny_model("bert"), tiny_model("bert", seed=1)
    return {"dense": a, "pruned": b}


def _run(seconds, rounds, **kw):
    models = _two_models()
    clock = FakeClock(seconds)
    forwards = {}
    import tshrink_harness.measure as M

    real = M._forward

    def spy(model, batch, device):
        fn = real(model, batch, device)
        forwards[id(fn)] = next(n for n, m in models.items() if m is model)
        return fn

    M._forward = spy
    try:
        clock.order = forwards
        out = interleaved_latency(models, latency_batch(97, 1, 8), "cpu", rounds=rounds, warmup=1, measure=clock, **kw)
    finally:
        M._forward = real
    return out, [forwards[c] for c in clock.calls], clock


def test_models_are_timed_interleaved_in_alternating_order_with_pinned_threads():
    before = torch.get_num_threads()
    out, order, clock = _run({"dense": [0.010] * 4, "pruned": [0.005] * 4}, rounds=4, threads=1)
    assert order == ["dense", "pruned", "pruned", "dense", "dense", "pruned", "pruned", "dense"]
    assert all(t == (1, 1) for t in clock.threads) and torch.get_num_threads() == before
    assert out["threads"] == 1 and out["models"]["dense"]["median_ms"] == pytest.approx(10.0)
    assert out["speedups"]["pruned"]["median"] == pytest.approx(2.0)


def test_speedup_is_the_median_of_paired_round_ratios_with_quartiles():
    # the machine slows down 3x in round 2 for both models: paired ratios stay 2, unpaired medians would not
    out, _, _ = _run({"dense": [0.010, 0.030, 0.010], "pruned": [0.005, 0.015, 0.004]}, rounds=3)
    s = out["speedups"]["pruned"]
    assert s["median"] == pytest.approx(2.0) and s["q25"] == pytest.approx(2.0) and s["q75"] == pytest.approx(2.25)
    d = out["models"]["dense"]
    assert d["rounds_ms"] == pytest.approx([10.0, 30.0, 10.0]) and d["min_ms"] == pytest.approx(10.0)
    assert d["repeats"] == 3 and d["warmup"] == 1 and d["batch_size"] == 1 and d["seq_len"] == 8


def test_bad_rounds_are_refused():
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleaved_latency(_two_models(), latency_batch(97, 1, 8), "cpu", rounds=0)


def test_noise_flag_above_the_flops_bound_only():
    assert speedup_flag(2.3, 0.5) == "noise" and speedup_flag(1.9, 0.5) is None
    assert speedup_flag(2.0, 0.5) is None  # exactly the bound is possible
    assert speedup_flag(1.3, 1.0) is None and speedup_flag(3.0, None) is None  # nothing removed / unknown
    assert speedup_flag(2.1, 0.5, tolerance=0.1) is None


def test_latency_record_and_table_cells(monkeypatch):
    import tshrink_harness.measure as M

    ratios = iter([0.010, 0.002] * 10)
    monkeypatch.setattr(M, "benchmark_times", lambda fn, **kw: [next(ratios)])
    models = _two_models()
    rec = latency_record(models["dense"], models["pruned"], [latency_batch(97, 1, 8), latency_batch(97, 2, 8)],
                         "cpu", flops_kept=0.5, rounds=1, warmup=0)
    assert [b["batch_size"] for b in rec["batches"]] == [1, 2]
    assert rec["speedup"] == pytest.approx(5.0) and rec["flag"] == "noise"  # 5x at half the FLOPs: not real
    assert speedup_cell(rec).startswith("noise (5.00x > 1/0.50)")
    dense = latency_record(models["dense"], None, [latency_batch(97, 1, 8)], "cpu", rounds=1, warmup=0)
    assert dense["speedup"] == 1.0 and dense["flag"] is None and speedup_cell(dense) == "1.00x [1.00-1.00]"
    assert speedup_cell({"speedup": 1.67, "pruned": {}}) == "1.67x unverified"  # an old-protocol record
    assert speedup_cell({"speedup": 2.22, "pruned": {}}, flops_kept=0.5) == "noise (2.22x > 1/0.50)"


def test_pricing_option_values():
    assert parse_pricing("avg") == "avg" and parse_pricing("Padded") == "padded" and parse_pricing("53") == 53
    for bad in ("0", "-3", "mean", "1.5"):
        with pytest.raises(ValueError, match="--flops-seq-len"):
            parse_pricing(bad)

    class Calib:
        n_tokens, n_examples = 107, 2

    assert pricing_length("avg", 128, Calib()) == (54, "avg (53.50 real tokens per calibration example)")
    assert pricing_length("padded", 128, None)[0] == 128 and pricing_length(40, 128, None)[0] == 40
    assert pricing_length("avg", 128, None, lambda: Calib())[0] == 54  # built only when needed


def test_compare_prices_at_the_calibration_datas_mean_length(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, data, results = tiny_bert_dir(tmp_path), glue_dir(tmp_path), tmp_path / "results"
    argv = ["compare", "--model", str(model), "--task", "sst2", "--data-dir", str(data), "--methods", "fisher",
            "--flops", "0.5", "--calib-samples", "8", "--seq-len", "24", "--results", str(results),
            "--latency-warmup", "0", "--latency-repeats", "1", "--latency-batch", "1", "--latency-min-time", "0.01",
            "--flops-seq-len", "avg"]
    assert main(argv) == 0
    recs = [json.loads(f.read_text()) for f in sorted((results / "runs").rglob("*.json"))]
    run = next(r for r in recs if r["method"] == "fisher")
    mean = run["calibration"]["tokens"] / run["calibration"]["examples"]
    assert run["flops"]["priced_seq_len"] == round(mean) < 24 and run["flops"]["pricing"].startswith("avg")
    assert run["flops"]["analytic_kept"] <= 0.5 + 1e-9  # the budget holds at the priced length
    assert run["flops"]["analytic_kept_padded"] is not None and run["settings"]["flops_seq_len"].startswith("avg")
    fid = run["prune"]["stages"]["fidelity"]
    assert fid["settings"]["pricing_len"] == round(mean) and not any("priced" in d for d in fid["deviations"])
    assert run["calibration"]["sampling"] == "with replacement"
    board = (results / "LEADERBOARD.md").read_text()
    assert "FLOPs kept @24" in board and "(priced)" in board and "vs authors' code" in board
    with pytest.raises(SystemExit, match="--flops-seq-len 'nonsense'"):
        main(argv[:-1] + ["nonsense"])
