"""A long prune resumes after a kill: per-layer state written atomically (tshrink.resume), a
rerun continues from the last finished layer and gives the same weights, bit for bit, as an
uninterrupted run. The kill is simulated by an exception right after layer k's state is saved."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from tshrink.errors import StageError
from tshrink.pipeline import prune
from tshrink.resume import MARKER, ResumeDir, StageState
from tshrink.testing import contract_setup


class Killed(RuntimeError):
    pass


def _setup(family="llama"):
    model, calib = contract_setup(family)
    return model, calib


def _kill_after(monkeypatch, stage: str, layer: int):
    real = StageState.save

    def save(self, i, tensors, meta):
        real(self, i, tensors, meta)
        if stage in self.folder.name and i == layer:
            raise Killed(f"killed after {stage} layer {i}")

    monkeypatch.setattr(StageState, "save", save)


@pytest.mark.parametrize("stage,sequential", [("correct", "layer"), ("score", "layer"), ("correct", "sublayer"),
                                              ("correct", "none")])
def test_rerun_after_a_kill_continues_and_matches_the_uninterrupted_run(tmp_path, monkeypatch, stage, sequential):
    model, calib = _setup()
    opts = {"stat_sequential": sequential}
    ref = prune(copy.deepcopy(model), "stat", 0.6, calib=calib, options=opts)
    where = tmp_path / "resume"
    with monkeypatch.context() as m:
        _kill_after(m, stage, 1)
        with pytest.raises(StageError, match="killed after"):
            prune(copy.deepcopy(model), "stat", 0.6, calib=calib, options=opts, resume=where)
    assert (where / MARKER).is_file() and len(list(where.rglob("layer-*.safetensors"))) >= 2
    net = copy.deepcopy(model)
    res = prune(net, "stat", 0.6, calib=calib, options=opts, resume=where)
    assert res.report["stages"][f"stat:{stage}"]["resumed_layers"] == [0, 1]
    assert res.report["widths_after"] == ref.report["widths_after"]
    want = ref.model.state_dict()
    for name, t in net.state_dict().items():
        assert torch.equal(t, want[name]), name
    assert not where.exists()  # a finished prune removes its resume directory


def test_state_of_another_run_is_not_reused(tmp_path, monkeypatch):
    model, calib = _setup()
    where = tmp_path / "resume"
    with monkeypatch.context() as m:
        _kill_after(m, "correct", 1)
        with pytest.raises(StageError):
            prune(copy.deepcopy(model), "stat", 0.6, calib=calib, resume=where)
    other = prune(copy.deepcopy(model), "stat", 0.5, calib=calib, resume=where)  # another budget: fresh start
    assert "resumed_layers" not in other.report["stages"]["stat:correct"]
    ref = prune(copy.deepcopy(model), "stat", 0.5, calib=calib)
    for name, t in other.model.state_dict().items():
        assert torch.equal(t, ref.model.state_dict()[name]), name


def test_a_foreign_directory_is_refused_and_left_alone(tmp_path):
    where = tmp_path / "mine"
    where.mkdir()
    (where / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="was not written by tshrink"):
        ResumeDir(where, "k")
    assert (where / "notes.txt").read_text() == "keep me"
    own = ResumeDir(tmp_path / "own", "k1")
    st = own.stage("correct:stat")
    st.save(0, {"x": torch.ones(2)}, {"a": 1})
    (own.root / "user.txt").write_text("mine")
    assert ResumeDir(tmp_path / "own", "k1").stage("correct:stat").load(0)[1] == {"a": 1}
    again = ResumeDir(tmp_path / "own", "k2")  # another run: our files go, the user's stay
    assert again.stage("correct:stat").load(0) is None and (own.root / "user.txt").is_file()
    assert json.loads((own.root / MARKER).read_text())["key"] == "k2"
    again.remove()
    assert (own.root / "user.txt").is_file() and not (own.root / MARKER).exists()


def test_harness_prune_resumes_under_offload_in_bfloat16(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from _harness_fixtures import tiny_llama_dir
    from tshrink_harness.cli import main

    model_dir = tiny_llama_dir(tmp_path)
    argv = ["prune", "--method", "stat", "--model", str(model_dir), "--flops", "0.6", "--calib-samples", "4",
            "--seq-len", "16", "--dtype", "bfloat16", "--offload", "always"]
    assert main(argv + ["--output", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, "correct", 0)
        assert main(argv + ["--output", str(out)]) != 0
    state = tmp_path / ".out.tshrink-resume"
    assert (state / MARKER).is_file() and not out.exists()
    assert main(argv + ["--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["stat:correct"]["resumed_layers"] == [0] and report["placement"]["layers"] == "offload"
    ref, got = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not state.exists()


def test_progress_names_layer_and_pass(monkeypatch):
    import tshrink.pipeline as P

    notes: list[tuple[str, str]] = []

    class Bar(list):
        def __init__(self, iterable, desc="", total=None):
            super().__init__(iterable)
            self.desc = desc

        def set_postfix_str(self, text):
            notes.append((self.desc, text))

    monkeypatch.setattr(P, "tracked", Bar)
    model, calib = _setup()
    prune(model, "stat", 0.6, calib=calib, progress=True, options={"stat_sequential": "sublayer"})
    texts = [t for d, t in notes if d == "correct:stat layers"]
    import re

    seen = [tuple(map(int, re.match(r"layer (\d+) pass (\d+)/(\d+) \(", t).groups())) for t in texts]
    assert sorted({layer for layer, _, _ in seen}) == [0, 1, 2]
    for layer in range(3):  # passes counted 1..n within each layer
        mine = [(i, n) for lay, i, n in seen if lay == layer]
        assert [i for i, _ in mine] == list(range(1, mine[0][1] + 1)) and len({n for _, n in mine}) == 1
