"""Never lose a user's data: outputs, refusals, errors a user can act on (issue: data safety).

Each data-loss case leaves the user's files untouched; each bad input gets one line and exit 2,
checked before any model is loaded.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from _harness_fixtures import forbid_model_loading, run_cli, tiny_bert_dir, tiny_llama_dir
from tshrink import hookimpl
from tshrink.checkpoint import MANIFEST, load_pruned, save_pruned
from tshrink.outputs import OLD, STAGE, OutputError, atomic_dir, check_output_dir, clean_stale
from tshrink.spec import MethodSpec, Recipe, StageSpec

QUICK = ["--latency-warmup", "0", "--latency-repeats", "1", "--eval-samples", "1"]


def _tree(root):
    """Every file under ``root`` with its bytes (what must stay untouched)."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_dir(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "thesis.tex").write_text("years of work\n")
    (root / "figs").mkdir(exist_ok=True)
    (root / "figs" / "plot.png").write_bytes(b"\x89PNG user")
    return root


def _prune(model, output, *extra):
    return ["prune", "--model", str(model), "--method", "magnitude", "--flops", "0.6", "--seq-len", "16",
            "--calib-samples", "2", "--output", output, *extra]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- --output: refuse before any work --------------------------------------------------------
@pytest.mark.parametrize("output", [".", "", "..", "~"])
def test_output_never_the_working_directory_its_parents_or_home(output, tmp_path, monkeypatch, capsys):
    work = _user_dir(tmp_path / "home" / "project")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    forbid_model_loading(monkeypatch)
    before = _tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, err = run_cli(_prune(tmp_path / "no-model", output, *extra), capsys)
        assert rc == 2 and err.count("\n") == 1 and "--output" in err, err
        assert "new directory" in err or "empty" in err
    assert _tree(tmp_path) == before


def test_output_user_directory_is_never_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    forbid_model_loading(monkeypatch)
    user = _user_dir(tmp_path / "mine")
    before = _tree(user)
    for extra in ([], ["--overwrite"]):
        rc, err = run_cli(_prune(tmp_path / "no-model", str(user), *extra), capsys)
        assert rc == 2 and str(user) in err and "did not write" in err and err.count("\n") == 1, err
    assert _tree(user) == before


def test_output_that_is_a_file_or_under_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    forbid_model_loading(monkeypatch)
    (tmp_path / "notes.txt").write_text("keep\n")
    rc, err = run_cli(_prune(tmp_path / "no-model", "notes.txt"), capsys)
    assert rc == 2 and "is a file" in err
    rc, err = run_cli(_prune(tmp_path / "no-model", "notes.txt/pruned"), capsys)
    assert rc == 2 and "is a file" in err
    assert (tmp_path / "notes.txt").read_text() == "keep\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: permissions cannot be denied to it")
def test_output_unwritable(tmp_path, monkeypatch, capsys):
    forbid_model_loading(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, err = run_cli(_prune(tmp_path / "no-model", str(locked / "out")), capsys)
    finally:
        locked.chmod(0o700)
    assert rc == 2 and "permission denied" in err


def test_output_unwritable_as_seen_by_the_check(tmp_path, monkeypatch, capsys):
    """The same refusal where permissions cannot be denied (root): the check asks os.access."""
    forbid_model_loading(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    rc, err = run_cli(_prune(tmp_path / "no-model", str(locked / "out")), capsys)
    assert rc == 2 and "permission denied" in err and str(locked) in err


def test_finetune_force_never_replaces_a_users_directory(tmp_path, monkeypatch, capsys):
    from _harness_fixtures import glue_dir

    forbid_model_loading(monkeypatch)
    user = _user_dir(tmp_path / "mine")
    before = _tree(user)
    rc, err = run_cli(["finetune", "--task", "sst2", "--model", str(tiny_bert_dir(tmp_path)), "--data-dir",
                       str(glue_dir(tmp_path)), "--output", str(user), "--force"], capsys)
    assert rc == 2 and "did not write" in err and _tree(user) == before


def test_checkpoint_replaced_only_with_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    model, out = tiny_llama_dir(tmp_path), "pruned"
    rc, err = run_cli(_prune(model, out), capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / out / "report.json").read_text())["method"] == "magnitude"
    first = _tree(tmp_path / out)
    rc, err = run_cli(_prune(model, out), capsys)
    assert rc == 2 and "--overwrite" in err and _tree(tmp_path / out) == first
    rc, err = run_cli(_prune(model, out, "--overwrite"), capsys)
    assert rc == 0, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned")] == []  # no staging left
    assert load_pruned(tmp_path / out) is not None
    # the input model's directory is never the output
    rc, err = run_cli(_prune(out, out, "--overwrite"), capsys)
    assert rc == 2 and "input model" in err


def test_outputs_respect_the_umask(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    old = os.umask(0o022)
    try:
        model = tiny_llama_dir(tmp_path)
        assert run_cli(_prune(model, str(tmp_path / "p")), capsys)[0] == 0
        assert run_cli(["compare", "--model", str(model), "--methods", "magnitude", "--flops", "0.6",
                        "--seq-len", "16", "--results", str(tmp_path / "res"), *QUICK], capsys)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o755
    for f in [tmp_path / "p" / MANIFEST, tmp_path / "p" / "report.json", *(tmp_path / "res").rglob("*.json")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ---- atomic swap, staging clean-up ----------------------------------------------------------------
def test_failed_write_keeps_the_old_checkpoint_and_leaves_no_staging(tmp_path):
    from conftest import tiny_model

    model = tiny_model("bert")
    path = save_pruned(model, tmp_path / "ckpt")
    before = _tree(path)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_dir(path, markers=(MANIFEST,), overwrite=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk on fire")
    assert _tree(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_swap_renames_aside_then_in(tmp_path, monkeypatch):
    """A kill between the two renames leaves the old directory under a name the next write restores."""
    from conftest import tiny_model

    path = save_pruned(tiny_model("bert"), tmp_path / "ckpt")
    before = _tree(path)
    real = os.rename
    calls = []

    def rename(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:  # the second rename (new -> path): simulate the kill
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(tiny_model("bert", seed=1), path, overwrite=True)
    monkeypatch.setattr(os, "rename", real)
    assert OLD in calls[0][1] and calls[0][0] == str(path)
    # the handler put the old one back; emulate a hard kill by moving it aside again under a dead pid
    assert _tree(path) == before
    stranded = tmp_path / f".ckpt.{OLD}-{_dead_pid()}-0123abcd"
    real(path, stranded)
    stale = tmp_path / f".ckpt.{STAGE}-{_dead_pid()}-89abcdef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    clean_stale(path)
    assert _tree(path) == before and not stale.exists() and not stranded.exists()


def test_stale_staging_of_live_processes_and_other_names_is_left_alone(tmp_path):
    live = tmp_path / f".ckpt.{STAGE}-{os.getppid()}-0123abcd"
    other = tmp_path / ".ckpt.something-else"
    user = tmp_path / f".ckpt.{STAGE}-{_dead_pid()}-not-ours"
    for d in (live, other, user):
        d.mkdir()
    assert clean_stale(tmp_path / "ckpt") == []
    assert live.exists() and other.exists() and user.exists()


def test_directory_changed_while_working_keeps_the_new_output(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="kept at"):
        with atomic_dir(target, markers=(MANIFEST,)) as tmp:
            (tmp / MANIFEST).write_text("{}")
            _user_dir(target)  # the user filled the directory meanwhile
    assert (target / "thesis.tex").exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert len(kept) == 1 and (kept[0] / MANIFEST).exists()


def test_api_refuses_like_the_cli(tmp_path, monkeypatch):
    from conftest import tiny_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="working directory"):
        save_pruned(tiny_model("bert"), ".", overwrite=True)
    save_pruned(tiny_model("bert"), "ckpt")
    with pytest.raises(OutputError, match="overwrite=True"):
        save_pruned(tiny_model("bert"), "ckpt")
    check_output_dir("ckpt", markers=(MANIFEST,), overwrite=True)


# ---- the model's head is kept -------------------------------------------------------------------
def test_classifier_head_survives_a_prune_with_the_default_task(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model = tiny_bert_dir(tmp_path)  # BertForSequenceClassification
    rc, err = run_cli(["prune", "--model", str(model), "--method", "magnitude", "--flops", "0.6", "--seq-len", "16",
                       "--calib-samples", "2", "--output", str(tmp_path / "p")], capsys)
    assert rc == 0, err
    pruned = load_pruned(tmp_path / "p")
    assert type(pruned).__name__ == "BertForSequenceClassification"
    from transformers import BertForSequenceClassification

    dense = BertForSequenceClassification.from_pretrained(model)
    assert torch.equal(pruned.classifier.weight, dense.classifier.weight)


# ---- errors a user can act on -----------------------------------------------------------------------
def _checkpoint(tmp_path):
    from conftest import tiny_model

    from tshrink.pipeline import prune

    model = tiny_model("llama", head="causal-lm")
    prune(model, "magnitude", 0.6, seq_len=16)
    path = save_pruned(model, tmp_path / "ckpt")
    from _tokenizers import byte_bpe_tokenizer

    byte_bpe_tokenizer(["some text for a tokenizer"]).save_pretrained(path)
    return path


def _manifest(path):
    return json.loads((path / MANIFEST).read_text())


@pytest.mark.parametrize("edit, expect", [
    (lambda m: m.update(architecture="Module"), "architecture 'Module' is not a model class"),
    (lambda m: m.update(architecture="os"), "architecture 'os' is not a model class"),
    (lambda m: m.pop("widths"), "field 'widths' is missing"),
    (lambda m: m["widths"]["heads"].__setitem__(1, m["widths"]["heads"][1] - 1 or 1), "disagrees with tensor"),
    (lambda m: m["widths"]["neurons"].append(3), "head counts but"),
    (lambda m: m["widths"]["heads"].__setitem__(0, 99), "more than config.json"),
    (lambda m: m["widths"].__setitem__("heads", "all"), "list of non-negative integers"),
])
def test_edited_manifest_names_the_field(edit, expect, tmp_path, capsys):
    path = _checkpoint(tmp_path)
    manifest = _manifest(path)
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=expect):
        load_pruned(path)
    capsys.readouterr()  # the set-up's own output
    rc, err = run_cli(_prune(path, str(tmp_path / "out")), capsys)
    assert rc == 2 and err.count("\n") == 1 and MANIFEST in err, err


def test_manifest_widths_disagreeing_with_a_tensor_names_both(tmp_path):
    path = _checkpoint(tmp_path)
    manifest = _manifest(path)
    layer = next(i for i, n in enumerate(manifest["widths"]["neurons"]) if n > 1)
    manifest["widths"]["neurons"][layer] -= 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"layer {layer}: .*disagrees with tensor '.*layers\.{layer}\.mlp"):
        load_pruned(path)


def test_damaged_files_get_one_line(tmp_path, capsys):
    path = _checkpoint(tmp_path)
    (path / MANIFEST).write_text("{ not json")
    capsys.readouterr()
    rc, err = run_cli(_prune(path, str(tmp_path / "o1")), capsys)
    assert rc == 2 and "not valid JSON" in err and err.count("\n") == 1
    path = _checkpoint(tmp_path / "b")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    capsys.readouterr()
    rc, err = run_cli(_prune(path, str(tmp_path / "o2")), capsys)
    assert rc == 2 and "model.safetensors" in err and "damaged or truncated" in err and err.count("\n") == 1


def test_damaged_plain_hugging_face_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model = tiny_llama_dir(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rc, err = run_cli(_prune(model, str(tmp_path / "o")), capsys)
    assert rc == 2 and "damaged or truncated" in err and err.count("\n") == 1, err


def test_unknown_relative_model_name_says_so_at_once(tmp_path, monkeypatch, capsys):
    from tshrink.models import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ft-mrpc").mkdir()
    (tmp_path / "ft-mrpc" / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_model_loading(monkeypatch)
    rc, err = run_cli(_prune("ft-mrcp", str(tmp_path / "o")), capsys)
    assert rc == 2 and "not a local directory or a built-in" in err and "'ft-mrpc'" in err and "hub is switched off" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model("someone/some-model") == "someone/some-model"
    assert "trying the Hugging Face hub" in capsys.readouterr().err


def test_fisher_with_one_token_windows_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    forbid_model_loading(monkeypatch)
    model = tiny_llama_dir(tmp_path)
    rc, err = run_cli(["prune", "--model", str(model), "--method", "fisher", "--flops", "0.6", "--seq-len", "1",
                       "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no next-token target" in err


def test_fisher_refuses_a_loss_without_targets():
    from conftest import tiny_batches, tiny_model

    from tshrink.pipeline import prune

    model = tiny_model("llama", head="causal-lm")
    calib = tiny_batches("llama", seq=1, labels="lm")
    with pytest.raises(Exception, match="no usable targets|no next-token label"):
        prune(model, "fisher", 0.6, calib=calib, seq_len=16)


def test_capped_calibration_is_visible_and_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model = tiny_llama_dir(tmp_path)
    rc, err = run_cli(["compare", "--model", str(model), "--methods", "stat", "--flops", "0.6", "--seq-len", "32",
                       "--calib-samples", "100000", "--results", str(tmp_path / "r"), *QUICK], capsys)
    assert rc == 0 and "--calib-samples 100000 asks for more" in err
    rec = next(json.loads(f.read_text()) for f in (tmp_path / "r").rglob("stat@*.json"))
    assert rec["calibration"]["requested"] == 100000 and rec["calibration"]["examples"] < 100000


def test_internal_error_is_named_as_a_bug_with_its_traceback(tmp_path, monkeypatch, capsys):
    import tshrink_harness.run

    def bug(**kw):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(tshrink_harness.run, "prune_to_dir", bug)
    rc, err = run_cli(["prune", "--model", "x", "--method", "magnitude", "--flops", "0.5", "--output", "o"], capsys)
    assert rc == 1 and "Traceback" in err and "internal error (ZeroDivisionError: oops)" in err and "bug" in err


class Saboteur:
    """A third-party correct stage that damages the model half-way, then fails (or not, once fixed)."""

    broken = True

    @hookimpl
    def tshrink_stages(self):
        return [StageSpec("correct", "saboteur")]

    @hookimpl
    def tshrink_methods(self):
        return [MethodSpec("sabotaged", Recipe(score="magnitude", select="global", correct=("saboteur",)))]

    @hookimpl
    def tshrink_correct(self, name, ctx, selection, options):
        if name != "saboteur":
            return None
        if Saboteur.broken:
            for p in ctx.model.parameters():
                p.data.zero_()
            raise RuntimeError("sabotage half-way")
        return selection


def _pm():
    from tshrink.manager import get_plugin_manager

    return get_plugin_manager(plugins=[Saboteur()])


def test_prune_copy_leaves_the_callers_model_untouched(monkeypatch):
    from conftest import tiny_batches, tiny_model

    from tshrink.pipeline import prune

    monkeypatch.setattr(Saboteur, "broken", True)
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune(model, "stat", 0.5, calib=tiny_batches("bert"), copy=True)
    assert res.model is not model and res.report["params_after"] < res.report["params_before"]
    with pytest.raises(Exception, match="sabotage half-way"):
        prune(model, "sabotaged", 0.5, pm=_pm(), copy=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(Exception, match="sabotage half-way"):  # in place (the default): documented as modified
        prune(model, "sabotaged", 0.5, pm=_pm())
    assert not all(torch.equal(model.state_dict()[k], before[k]) for k in before)


# ---- one failure never stops the rest -------------------------------------------------------------
def test_compare_records_a_failing_method_and_goes_on(tmp_path, monkeypatch, capsys):
    import tshrink.manager

    from tshrink_harness.leaderboard import build

    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    monkeypatch.setattr(Saboteur, "broken", True)
    real = tshrink.manager.get_plugin_manager
    monkeypatch.setattr(tshrink.manager, "get_plugin_manager",
                        lambda plugins=(), **kw: real(plugins=[Saboteur(), *plugins], **kw))
    model, results = tiny_llama_dir(tmp_path), tmp_path / "r"
    argv = ["compare", "--model", str(model), "--methods", "sabotaged,magnitude", "--flops", "0.7,0.5",
            "--seq-len", "32", "--calib-samples", "2", "--results", str(results), *QUICK]
    rc, err = run_cli(argv, capsys)
    assert rc == 1
    recs = [json.loads(f.read_text()) for f in sorted((results / "runs").rglob("*.json"))]
    failed = [r for r in recs if r.get("status") == "failed"]
    assert sorted((r["method"], r["budget"]) for r in failed) == [("sabotaged", 0.5), ("sabotaged", 0.7)]
    assert all("sabotage half-way" in r["failure"]["message"] for r in failed)
    assert all(r["failure"]["stage"].endswith("saboteur") or r["failure"]["stage"] == "prune" for r in failed)
    assert sorted(r["budget"] for r in recs if r["method"] == "magnitude") == [0.5, 0.7]
    board = (results / "LEADERBOARD.md").read_text()
    assert "failed (" in board and "sabotage half-way" in board
    build(results)  # the leaderboard rebuilds with failure records in it
    # a re-run retries the failed runs (here: the plugin got fixed) and skips the finished ones
    monkeypatch.setattr(Saboteur, "broken", False)
    rc, err = run_cli(argv, capsys)
    assert rc == 0, err
    recs = [json.loads(f.read_text()) for f in sorted((results / "runs").rglob("*.json"))]
    assert len(recs) == 5 and not [r for r in recs if r.get("status") == "failed"]


def test_main_job_computes_and_shows_committed_figures(tmp_path, monkeypatch, capsys):
    """Runs go to runs/ by default, so a fresh clone computes; committed records with the same key
    are shown beside the new figures, and a difference is flagged."""
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    model = tiny_llama_dir(tmp_path)
    argv = ["compare", "--model", str(model), "--methods", "magnitude", "--flops", "0.6", "--seq-len", "32",
            "--calib-samples", "2", *QUICK]
    assert run_cli(argv + ["--results", "results"], capsys)[0] == 0  # "committed" figures
    committed = _tree(tmp_path / "results")
    capsys.readouterr()
    from tshrink_harness.cli import main

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[run] magnitude @ 0.6" in out and "[skip]" not in out  # computed, not replayed
    assert (tmp_path / "runs" / "runs").is_dir() and _tree(tmp_path / "results") == committed
    assert "Recomputed here vs the records in results/" in out and "DIFFERENT" not in out
    # resume: the user's own runs are skipped the second time
    assert main(argv) == 0 and "[skip] magnitude @ 0.6" in capsys.readouterr().out
    # a committed figure that differs is flagged
    rec_file = next((tmp_path / "results" / "runs").rglob("magnitude@*.json"))
    rec = json.loads(rec_file.read_text())
    rec["metrics"][rec["main_metric"]] *= 1.5
    rec_file.write_text(json.dumps(rec))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "DIFFERENT" in out and "differ from the committed ones" in out
