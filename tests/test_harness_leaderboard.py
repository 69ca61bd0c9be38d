"""LEADERBOARD.md and the Pareto plots are rebuilt from the JSON records alone, byte for byte."""
from __future__ import annotations

import shutil

from _harness_fixtures import tiny_llama_dir
from tshrink_harness.cli import main


def _snapshot(results):
    return {p.relative_to(results): p.read_bytes() for p in sorted(results.rglob("*"))
            if p.is_file() and p.suffix in (".md", ".png")}


def test_leaderboard_is_reproducible_from_records(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, results = tiny_llama_dir(tmp_path), tmp_path / "results"
    assert main(["compare", "--model", str(model), "--methods", "magnitude,magnitude-uniform", "--flops", "0.7,0.5",
                 "--seq-len", "32", "--eval-samples", "1", "--results", str(results),
                 "--latency-warmup", "0", "--latency-repeats", "1"]) == 0
    first = _snapshot(results)
    board = first[results.joinpath("LEADERBOARD.md").relative_to(results)].decode()
    assert "| magnitude-uniform" in board and "FLOPs: fvcore, 1 multiply-add = 1 FLOP" in board
    assert "bits/weight" in board and "size MB" in board and "ratio" in board
    pngs = [p for p in first if p.suffix == ".png"]
    assert len(pngs) == 1 and first[pngs[0]].startswith(b"\x89PNG")
    assert main(["leaderboard", "--results", str(results)]) == 0
    assert _snapshot(results) == first
    # from the records alone: a copy without the generated files rebuilds the same bytes
    copy = tmp_path / "copy"
    shutil.copytree(results / "runs", copy / "runs")
    assert main(["leaderboard", "--results", str(copy)]) == 0
    assert _snapshot(copy) == first
    # a stale plot of a group that no longer exists is removed
    (copy / "plots" / "old.png").write_bytes(b"x")
    assert main(["leaderboard", "--results", str(copy)]) == 0
    assert _snapshot(copy) == first


def test_empty_leaderboard(tmp_path, capsys):
    assert main(["leaderboard", "--results", str(tmp_path)]) == 0
    assert "no records yet" in (tmp_path / "LEADERBOARD.md").read_text()
