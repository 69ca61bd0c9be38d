"""`harness compare` end to end on tiny local models: records, resume, tables, fields."""
from __future__ import annotations

import json

import pytest

from _harness_fixtures import glue_dir, tiny_bert_dir, tiny_llama_dir
from tshrink_harness import records as R
from tshrink_harness.cli import main

QUICK = ["--latency-warmup", "0", "--latency-repeats", "1", "--no-leaderboard"]


def _records(results):
    return sorted((p for p in (results / "runs").rglob("*.json")), key=str)


def test_compare_causal_records_resume_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, results = tiny_llama_dir(tmp_path), tmp_path / "results"
    argv = ["compare", "--model", str(model), "--methods", "magnitude,magnitude-uniform", "--flops", "0.7,0.5",
            "--seq-len", "32", "--calib-samples", "4", "--eval-samples", "2", "--results", str(results), *QUICK]
    assert main(argv) == 0
    out = capsys.readouterr().out
    files = _records(results)
    assert len(files) == 5  # dense + 2 methods x 2 budgets
    assert "| magnitude-uniform" in out and "| dense" in out and "FLOPs: fvcore, 1 multiply-add = 1 FLOP" in out
    recs = [json.loads(f.read_text()) for f in files]
    dense = next(r for r in recs if r["method"] == "dense")
    assert dense["task"]["name"] == "pydocs" and dense["main_metric"] == "perplexity"
    for rec in recs:
        assert rec["schema"] == R.SCHEMA and rec["model"]["hash"] == dense["model"]["hash"]
        for key in ("versions", "git", "device", "settings", "command", "seed", "evaluation", "flops", "size"):
            assert key in rec, key
        assert rec["evaluation"]["seq_len"] == 32 and rec["evaluation"]["stride"] == 32
        assert rec["evaluation"]["windows"] == 2 and rec["settings"]["eval_samples"] == 2
        lat = rec["latency"]
        assert lat["pruned"]["batch_size"] == 1 and lat["pruned"]["seq_len"] == 32 and lat["pruned"]["repeats"] == 1
        assert lat["dense"]["median_ms"] > 0 and lat["speedup"] > 0
        if rec["method"] != "dense":
            assert rec["flops"]["kept"] <= rec["budget"] + 0.02 and rec["params"] < dense["params"]
            assert rec["calibration"] is None  # magnitude needs no calibration data: none is built
            assert rec["prune"]["time_s"] > 0 and rec["recipe"].startswith("score=magnitude")
            assert 1 < rec["size"]["compression_ratio"] and rec["size"]["bits_per_weight"] == 32
            assert rec["versions"]["torch"] and rec["command"][:2] == ["harness", "compare"]
    # a second run (an interrupted compare resumed) skips every record and writes nothing new
    before = {f: f.stat().st_mtime_ns for f in files}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("[skip]") == 4 and "[run]" not in out
    assert {f: f.stat().st_mtime_ns for f in _records(results)} == before
    # a new budget runs only the missing pairs
    assert main(argv[:6] + ["0.7,0.6"] + argv[7:]) == 0
    out = capsys.readouterr().out
    assert out.count("[skip]") == 2 and out.count("[run]") == 2 and len(_records(results)) == 7


def test_compare_glue_classifier(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, data, results = tiny_bert_dir(tmp_path), glue_dir(tmp_path), tmp_path / "results"
    argv = ["compare", "--model", str(model), "--task", "SST-2", "--data-dir", str(data), "--methods", "magnitude",
            "--flops", "0.6", "--calib-samples", "8", "--seq-len", "24", "--results", str(results), *QUICK[:-1]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    recs = [json.loads(f.read_text()) for f in _records(results)]
    assert {r["method"] for r in recs} == {"dense", "magnitude"}
    for rec in recs:
        assert rec["task"]["name"] == "sst2" and rec["main_metric"] == "accuracy"
        assert 0 <= rec["metrics"]["accuracy"] <= 1 and rec["evaluation"]["examples"] == 6
        assert rec["task"]["split"].startswith("validation")
    assert "accuracy" in out and "validation (GLUE dev)" in out
    board = (results / "LEADERBOARD.md").read_text()
    assert "## sst2" in board and (results / "plots").is_dir()


@pytest.mark.parametrize("family", ["llama"])
def test_record_key_changes_with_the_seed(tmp_path, capsys, family, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, results = tiny_llama_dir(tmp_path), tmp_path / "results"
    base = ["compare", "--model", str(model), "--methods", "magnitude", "--flops", "0.5", "--seq-len", "32",
            "--calib-samples", "2", "--eval-samples", "1", "--results", str(results), *QUICK]
    assert main(base) == 0 and main(base + ["--seed", "1"]) == 0
    recs = [json.loads(f.read_text()) for f in _records(results)]
    assert sorted(r["seed"] for r in recs if r["method"] != "dense") == [0, 1]
    assert len([r for r in recs if r["method"] == "dense"]) == 1  # dense does not depend on the seed


def test_compare_squad_names_its_split(tmp_path, capsys, monkeypatch):
    from _harness_fixtures import squad_dir, tiny_bert_qa_dir

    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, data, results = tiny_bert_qa_dir(tmp_path), squad_dir(tmp_path), tmp_path / "results"
    argv = ["compare", "--model", str(model), "--task", "squad", "--data-dir", str(data), "--methods", "magnitude",
            "--flops", "0.6", "--seq-len", "48", "--results", str(results), *QUICK]
    assert main(argv) == 0
    out = capsys.readouterr().out
    split = "dev-articles:train=0-1,eval=2-3"
    recs = [json.loads(f.read_text()) for f in _records(results)]
    for rec in recs:
        assert rec["task"]["squad_split"] == split and rec["evaluation"]["examples"] == 4
        assert set(rec["metrics"]) == {"exact_match", "f1"} and rec["main_metric"] == "f1"
    for line in out.splitlines():  # every row with a SQuAD number names the split
        if line.startswith(("| dense", "| magnitude")):
            assert split in line


def test_squad_calibration_is_labelled(tmp_path):
    from transformers import AutoTokenizer

    from _harness_fixtures import squad_dir, tiny_bert_qa_dir
    from tshrink_harness.tasks.registry import get_task

    task = get_task("squad", squad_split="dev-articles:train=0-2,eval=3-3")
    task.prepare(squad_dir(tmp_path), need_train=True)
    tok = AutoTokenizer.from_pretrained(tiny_bert_qa_dir(tmp_path))
    calib = task.calibration(tok, samples=4, seq_len=48, seed=0, batch_size=2)
    assert calib.has_labels and calib.n_examples == 4
    batch = calib.batches[0]
    assert (batch["start_positions"] > 0).all() and (batch["end_positions"] >= batch["start_positions"]).all()
    assert task.info["train_examples"] == 6 and task.info["eval_examples"] == 2


def test_compare_lmeval_local_task(tmp_path, capsys, monkeypatch):
    from test_lmeval import DOCS, TASK_YAML

    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    data_file = tmp_path / "docs.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data_file=data_file))
    model, results = tiny_llama_dir(tmp_path), tmp_path / "results"
    base = ["compare", "--model", str(model), "--methods", "magnitude", "--flops", "0.5", "--seq-len", "32",
            "--results", str(results), "--lmeval-include", str(tasks), *QUICK]
    assert main(base + ["--task", "lmeval:tshrink_tiny_mk"]) == 2
    assert "did you mean 'tshrink_tiny_mc'" in capsys.readouterr().err.lower()
    assert main(base + ["--task", "lmeval:tshrink_tiny_mc", "--eval-samples", "4"]) == 0
    recs = [json.loads(f.read_text()) for f in _records(results)]
    assert len(recs) == 2
    for rec in recs:
        assert rec["main_metric"] == "mean_acc" and 0 <= rec["metrics"]["tshrink_tiny_mc/acc"] <= 1
        assert rec["metrics"]["mean_acc"] == rec["metrics"]["tshrink_tiny_mc/acc"]
        assert rec["evaluation"]["documents"] == {"tshrink_tiny_mc": 4} and rec["task"]["include"] == str(tasks)
