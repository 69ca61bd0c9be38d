"""``harness compare --executor ray`` on a local Ray instance (2 CPUs) with tiny models.

Marked ``ray`` (deselect with ``-m "not ray"``): Ray start-up costs seconds, so the tests are few
and share one Ray instance. The checks of bad input need no Ray at all and always run.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from _harness_fixtures import tiny_llama_dir

TESTS = Path(__file__).resolve().parent
QUICK = dict(latency_batch=[1], latency_warmup=0, latency_repeats=1, latency_min_time=0.0, leaderboard=False,
             reference=None)
#: timings, host and the executor's own fields: the only ones allowed to differ between executors
VOLATILE = {"latency", "generation", "device", "executor", "versions", "git"}
VOLATILE_NESTED = {("prune", "time_s"), ("prune", "timings_s"), ("evaluation", "time_s"), ("failure", "traceback")}


def _comparable(rec):
    out = {k: copy.deepcopy(v) for k, v in rec.items() if k not in VOLATILE}
    for outer, inner in VOLATILE_NESTED:
        out.get(outer, {}).pop(inner, None)
    return out


def _records(results):
    return {f.name: json.loads(f.read_text()) for f in sorted((results / "runs").rglob("*.json"))}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tshrink[ray]')")
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TSHRINK_DATA_DIR": ""}})
    yield ray
    ray.shutdown()


def _compare(model, results, methods, executor, **kw):
    from tshrink_harness.compare import compare

    return compare(methods=methods, model=str(model), budgets=[0.7, 0.5], options=kw.pop("options", {}),
                   seq_len=16, calib_samples=4, eval_samples=1, results_dir=str(results), executor=executor,
                   plugins=("_ray_plugins:plugin",), **QUICK, **kw)


@pytest.mark.ray
def test_ray_records_equal_serial_ones_and_failures_are_recorded(ray_local, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model = tiny_llama_dir(tmp_path)
    methods = "magnitude,stat,raises"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray tasks run with --cpus-per-run 1 = one torch thread
    try:
        _compare(model, tmp_path / "serial", methods, "serial")
    finally:
        torch.set_num_threads(threads)
    out = _compare(model, tmp_path / "ray", methods, "ray")
    serial, fanned = _records(tmp_path / "serial"), _records(tmp_path / "ray")
    assert sorted(serial) == sorted(fanned) and len(serial) == 7  # dense + 3 methods x 2 budgets
    for name in serial:
        assert _comparable(serial[name]) == _comparable(fanned[name]), name
        assert fanned[name]["executor"]["kind"] == "ray" and serial[name]["executor"] == {"kind": "serial"}
    failed = [r for r in fanned.values() if r.get("status") == "failed"]
    assert sorted(r["budget"] for r in failed) == [0.5, 0.7] and {r["method"] for r in failed} == {"raises"}
    assert all("this method always fails" in r["failure"]["message"] for r in failed)
    assert len(out) == 7
    # resume: the finished runs are skipped, only the failed ones are tried again
    capsys.readouterr()
    _compare(model, tmp_path / "ray", methods, "ray")
    stdout = capsys.readouterr().out
    assert stdout.count("[skip]") == 4 and "[done]" not in stdout and stdout.count("[failed] raises") == 2
    again = _records(tmp_path / "ray")
    assert {n: r for n, r in again.items() if "failure" not in r} == {n: r for n, r in fanned.items()
                                                                      if "failure" not in r}


@pytest.mark.ray
def test_a_killed_worker_is_retried_once_then_recorded(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, marker = tiny_llama_dir(tmp_path), tmp_path / "died-once"
    recs = _compare(model, tmp_path / "r", "dies,dies-always", "ray", options={"dies_marker": str(marker)})
    by = {(r["method"], r["budget"]): r for r in recs if r["method"] != "dense"}
    assert marker.exists()  # the first attempt died...
    assert by[("dies", 0.7)].get("status") != "failed" and by[("dies", 0.5)].get("status") != "failed"  # ...the retry ran
    for budget in (0.7, 0.5):
        rec = by[("dies-always", budget)]
        assert rec["status"] == "failed" and rec["failure"]["stage"] == "worker", rec["failure"]


# ---- bad input: no Ray needed ---------------------------------------------------------------------------
class _FakeRay:
    def __init__(self, nodes=()):
        self._nodes = list(nodes)

    def is_initialized(self):
        return False

    def init(self, **kw):
        raise AssertionError("ray.init must not be reached")

    def nodes(self):
        return self._nodes


def test_ray_missing_says_which_extra(monkeypatch):
    from tshrink_harness.ray_executor import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ValueError, match=r"pip install 'tshrink\[ray\]'"):
        import_ray()


def test_unreachable_address_fails_within_the_timeout():
    from tshrink_harness.ray_executor import connect

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"127.0.0.1:{port}.*no Ray cluster answered within 2 s"):
        connect(_FakeRay(), f"127.0.0.1:{port}", timeout=2)
    assert time.perf_counter() - start < 10
    with pytest.raises(ValueError, match="is not 'auto' or HOST:PORT"):
        connect(_FakeRay(), "nonsense")


def test_more_gpus_per_run_than_any_node_has_is_refused():
    from tshrink_harness.ray_executor import check_resources

    fake = _FakeRay([{"Alive": True, "Resources": {"CPU": 8, "GPU": 2}}, {"Alive": True, "Resources": {"CPU": 4}},
                     {"Alive": False, "Resources": {"CPU": 64, "GPU": 8}}])
    check_resources(fake, gpus_per_run=2, cpus_per_run=4, device="cuda")
    with pytest.raises(ValueError, match=r"--gpus-per-run 3: no node .* has that many GPUs \(most on one node: 2\)"):
        check_resources(fake, gpus_per_run=3, cpus_per_run=1, device="cuda")
    with pytest.raises(ValueError, match="needs --gpus-per-run"):
        check_resources(fake, gpus_per_run=0, cpus_per_run=1, device="cuda")


def test_cli_refuses_ray_flags_without_ray_executor(tmp_path, capsys):
    from _harness_fixtures import run_cli

    rc, err = run_cli(["compare", "--gpus-per-run", "1", "--results", str(tmp_path)], capsys)
    assert rc == 2 and "apply to --executor ray only" in err
