"""The harness command on tiny local models (no hub, no real data)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _harness_fixtures import cli_stdout_without_torch, run_cli
from conftest import tiny_model
from tshrink_harness.cli import main


def _tiny_dir(tmp_path, family="llama"):
    """A tiny model + tokenizer directory, as a user would pass with --model."""
    from _tokenizers import byte_bpe_tokenizer

    model = tiny_model(family, head="causal-lm")
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    byte_bpe_tokenizer(["some calibration text for a tiny model " * 20]).save_pretrained(path)
    return path


def test_help_and_plugins_are_instant_and_import_no_torch():
    out = cli_stdout_without_torch(["plugins"])
    assert "magnitude" in out and "tshrink" in out


def test_prune_writes_checkpoint_and_report(tmp_path, capsys):
    model_dir = _tiny_dir(tmp_path)
    out = tmp_path / "pruned"
    rc = main(["prune", "--method", "magnitude", "--model", str(model_dir), "--flops", "0.5",
               "--output", str(out), "--calib-samples", "4", "--seq-len", "16"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["flops_kept"] <= 0.5 and report["params_after"] < report["params_before"]
    assert report["fvcore_flops_after"] < report["fvcore_flops_before"]
    from tshrink.models import load_model

    reloaded, _ = load_model(str(out))
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]


@pytest.mark.parametrize("argv, message", [
    (["prune", "--method", "magnitud", "--flops", "0.5", "--output", "x"], "did you mean 'magnitude'"),
    (["prune", "--method", "magnitude", "--flops", "1.5", "--output", "x"], "outside (0, 1]"),
    (["prune", "--method", "magnitude", "--flops", "0.5", "--output", "x", "--model", "/no/such/dir"], "does not exist"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    rc, err = run_cli(argv, capsys)
    assert rc == 2
    assert message.lower() in err.lower()


def test_help_lists_the_harness_commands_without_torch():
    code = ("import sys, contextlib, io\nfrom tshrink_harness.cli import main\n"
            "for argv in (['--help'], ['compare', '--help'], ['finetune', '--help']):\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "    print(buf.getvalue())\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for word in ("finetune", "leaderboard", "tasks", "--task", "--lmeval-include", "--latency-repeats",
                 "--max-train-samples", "--calib-samples", "--seed", "--device"):
        assert word in out.stdout, word


def test_leaderboard_of_nothing_imports_no_torch(tmp_path):
    cli_stdout_without_torch(["leaderboard", "--results", str(tmp_path)])
    assert (tmp_path / "LEADERBOARD.md").exists()


def test_plugins_options_state_each_stat_default_with_its_reason(capsys):
    from tshrink_harness.cli import main

    assert main(["plugins", "--options"]) == 0
    out = capsys.readouterr().out
    stat = out.split("\nstat:\n", 1)[1].split("\n\n", 1)[0]
    assert "calibration: --calib-samples" in stat and "2048" in stat
    for name in ("stat_sketch=", "stat_center=", "stat_error_norm=", "stat_allocation=", "stat_sequential=",
                 "stat_damping=", "stat_repick=", "stat_prune_heads="):
        line = next(l for l in stat.splitlines() if name in l)
        assert "Default" in line, line
    fisher = out.split("\nfisher:\n", 1)[1].split("\n\n", 1)[0]
    assert "fisher_tune_teacher='search-sqrt'" in fisher and "fisher_grad_batch_size='auto'" in fisher
