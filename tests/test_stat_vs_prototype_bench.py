"""The STAT-vs-prototype benchmark's table: means, spreads and the verdict against the noise."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "stat_vs_prototype.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("stat_vs_prototype_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_verdict_against_the_larger_spread(bench):
    # means 80 vs 82: diff -2; spreads 1 and 3 -> noise 3 -> within noise
    assert bench.verdict([79.5, 80.5, 80.0], [80.5, 83.5, 82.0]) == "-2.0 (noise 3.0: within noise)"
    # means 80 vs 82, spreads 1 and 0.5 -> below; 84.5 vs 82.1 (spreads 1, 0.2) -> above
    assert bench.verdict([79.5, 80.5, 80.0], [81.75, 82.25, 82.0]) == "-2.0 (noise 1.0: **below**)"
    assert bench.verdict([84.0, 85.0], [82.0, 82.2]) == "+2.4 (noise 1.0: above)"
    assert bench.verdict([80.0], [81.0]) == "-1.0 (1 seed: no noise estimate)"
    assert bench.verdict(None, [81.0]) == "" and bench.verdict([1.0], None) == ""


def test_summarise_cells_and_verdict_columns(bench):
    rec = lambda lab, v: {"label": lab, "setting": "widths 60%", "metrics": {"f1": v}}  # noqa: E731
    records = [{"label": "dense", "setting": "dense", "metrics": {"f1": 90.0}},
               rec("prototype", 80.0), rec("prototype", 81.0), rec("stat", 83.0), rec("stat", 84.0)]
    lines = bench.summarise(records, "f1").splitlines()
    assert lines[0] == "| setting | prototype | stat | stat − prototype |"
    assert lines[2] == "| widths 60% | 80.5 ± 1.0 (2) | 83.5 ± 1.0 (2) | +3.0 (noise 1.0: above) |"
    # without prototype runs: no verdict column
    only = bench.summarise([records[0], rec("stat", 83.0)], "f1").splitlines()
    assert only[0] == "| setting | stat |"
