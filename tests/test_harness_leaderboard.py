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
    # a user's own figure under plots/ is never touched (it used to be deleted as "stale")
    (copy / "plots" / "old.png").write_bytes(b"x")
    assert main(["leaderboard", "--results", str(copy)]) == 0
    assert _snapshot(copy) == {**first, (copy / "plots" / "old.png").relative_to(copy): b"x"}
    # the plot of a group whose records are gone was the leaderboard's own: it is removed
    shutil.rmtree(copy / "runs")
    assert main(["leaderboard", "--results", str(copy)]) == 0
    assert sorted(p.name for p in (copy / "plots").glob("*.png")) == ["old.png"]


def test_leaderboard_refuses_a_board_it_did_not_write(tmp_path, capsys):
    (tmp_path / "LEADERBOARD.md").write_text("my notes\n")
    assert main(["leaderboard", "--results", str(tmp_path)]) == 2
    assert "was not written by `harness leaderboard`" in capsys.readouterr().err
    assert (tmp_path / "LEADERBOARD.md").read_text() == "my notes\n"


def test_empty_leaderboard(tmp_path, capsys):
    assert main(["leaderboard", "--results", str(tmp_path)]) == 0
    assert "no records yet" in (tmp_path / "LEADERBOARD.md").read_text()
