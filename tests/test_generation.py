"""Generation metrics of decoders (harness/generation.py): the cached greedy loop against a
recompute-everything reference, KV bytes per token against the analytic count, the interleaved
protocol and noise bound with a fake clock, and the fields in compare records and the leaderboard.
No timing assertions."""
from __future__ import annotations

import json

import pytest
import torch

from _harness_fixtures import tiny_llama_dir
from tshrink.pipeline import prune
from tshrink.testing import tiny_model
from tshrink_harness.cli import main
from tshrink_harness.generation import cache_bytes, generation_record, greedy_decode, weight_bytes
from tshrink_harness.leaderboard import generation_table
from tshrink_harness.tasks.lm_tasks import _kv_bytes_per_token


def _pair():
    dense = tiny_model("llama", head="causal-lm")
    pruned = prune(dense, "magnitude", 0.5, copy=True).model  # removes KV groups too
    return dense, pruned


def test_cached_greedy_decoding_matches_full_recompute():
    model = tiny_model("llama", head="causal-lm")
    ids = torch.randint(5, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    out, cache = greedy_decode(model, ids, 5)
    ref = ids
    with torch.no_grad():
        for _ in range(5):
            ref = torch.cat([ref, model(input_ids=ref, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref[:, 8:])
    assert cache_bytes(cache) == _kv_bytes_per_token(model) * 2 * (8 + 4)  # prompt + 4 cached decode steps


def test_record_measures_kv_bytes_peak_and_params_of_both_models():
    dense, pruned = _pair()
    rec = generation_record(dense, pruned, "cpu", batches=(1, 3), prompt_len=6, new_tokens=3, rounds=1, warmup=0,
                            min_run_time=0.001, flops_kept=0.5)
    kv = rec["kv_cache_bytes_per_token"]
    assert kv["dense"] == _kv_bytes_per_token(dense) and kv["pruned"] == _kv_bytes_per_token(pruned)
    assert kv["pruned"] < kv["dense"]
    assert rec["params"] == {"dense": sum(p.numel() for p in dense.parameters()),
                             "pruned": sum(p.numel() for p in pruned.parameters())}
    peak = rec["peak_memory"]
    assert peak["pruned"]["batch_size"] == 3 and peak["pruned"]["kv_bytes"] == kv["pruned"] * 3 * (6 + 2)
    assert peak["pruned"]["bytes"] < peak["dense"]["bytes"]
    assert [b["batch_size"] for b in rec["batches"]] == [1, 3]
    for b in rec["batches"]:
        assert b["dense"]["tokens_per_s"] > 0 and b["pruned"]["tokens_per_s"] > 0 and b["bound"] >= 2.0


class _Clock:
    """Fake torch.utils.benchmark: seconds per call by model, records the order."""

    def __init__(self, models, seconds):
        self.names = {id(m): n for n, m in models.items()}
        self.seconds, self.order = seconds, []

    def __call__(self, fn, *, min_run_time, threads):
        name = self.names[id(fn.__defaults__[0])]
        self.order.append(name)
        return [self.seconds[name].pop(0)]


def test_interleaved_tokens_per_second_speedup_and_noise_bound():
    dense, pruned = _pair()
    models = {"dense": dense, "pruned": pruned}
    clock = _Clock(models, {"dense": [0.4, 1.2, 0.4], "pruned": [0.2, 0.6, 0.16]})
    rec = generation_record(dense, pruned, "cpu", batches=(2,), prompt_len=4, new_tokens=4, rounds=3, warmup=0,
                            flops_kept=0.4, measure=clock)
    assert clock.order == ["dense", "pruned", "pruned", "dense", "dense", "pruned"]
    row = rec["batches"][0]
    assert row["dense"]["tokens_per_s"] == pytest.approx(2 * 4 / 0.4)  # median of 20, 6.67, 20
    assert row["speedup"] == pytest.approx(2.0) and row["speedup_q75"] == pytest.approx(2.25)
    assert row["bound"] == pytest.approx(2.5) and row["flag"] is None
    # 10x faster with 40 % of the FLOPs and about half the bytes: the machine, not the model
    clock = _Clock(models, {"dense": [1.0], "pruned": [0.1]})
    rec = generation_record(dense, pruned, "cpu", batches=(1,), prompt_len=4, new_tokens=2, rounds=1, warmup=0,
                            flops_kept=0.4, measure=clock)
    row = rec["batches"][0]
    assert row["flag"] == "noise" and row["speedup"] == pytest.approx(10.0)
    byte_ratio = weight_bytes(dense) / weight_bytes(pruned)
    assert row["bound"] >= byte_ratio > 1


def test_bad_generation_settings_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="new_tokens >= 1"):
        generation_record(*_pair(), "cpu", new_tokens=0)
    model = tiny_llama_dir(tmp_path)  # 64 positions
    code = main(["compare", "--model", str(model), "--methods", "magnitude", "--seq-len", "16", "--gen-prompt", "60", "--results",
                 str(tmp_path / "r"), "--no-leaderboard"])
    assert code == 2 and "--gen-prompt 60 + --gen-tokens 16 is longer than model" in capsys.readouterr().err


def test_compare_records_and_leaderboard_show_generation(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, results = tiny_llama_dir(tmp_path), tmp_path / "results"
    argv = ["compare", "--model", str(model), "--methods", "magnitude", "--flops", "0.5", "--seq-len", "16",
            "--calib-samples", "2", "--eval-samples", "1", "--results", str(results), "--latency-warmup", "0",
            "--latency-repeats", "1", "--latency-min-time", "0.001", "--gen-batch", "1,2", "--gen-prompt", "4",
            "--gen-tokens", "2"]
    assert main(argv) == 0
    recs = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]
    assert {r["method"] for r in recs} == {"dense", "magnitude"}
    for r in recs:
        g = r["generation"]
        assert [b["batch_size"] for b in g["batches"]] == [1, 2] and g["new_tokens"] == 2 and g["prompt_len"] == 4
        assert g["params"]["pruned"] == r["params"]
    board = (results / "LEADERBOARD.md").read_text()
    assert "Generation (greedy decoding with the KV cache)" in board and "tokens/s b2" in board
    # --gen-tokens 0: not measured, and the table leaves it out
    off = tmp_path / "off"
    assert main(argv[:-1] + ["0", "--results", str(off)]) == 0
    recs = [json.loads(p.read_text()) for p in sorted((off / "runs").rglob("*.json"))]
    assert all(r["generation"] is None for r in recs) and generation_table(recs) == []
