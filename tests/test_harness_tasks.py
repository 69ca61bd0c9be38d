"""Task registry, data-directory resolution and the harness's up-front errors."""
from __future__ import annotations

import pytest

from _harness_fixtures import (cli_stdout_without_torch, forbid_model_loading, glue_dir, run_cli, tiny_bert_dir,
                               tiny_llama_dir)
from tshrink_harness.data import resolve_data_dir
from tshrink_harness.tasks.registry import get_task, task_names


def test_registry_lists_every_task_kind():
    names = task_names()
    for name in ("sst2", "mrpc", "stsb", "rte", "cola", "qqp", "mnli", "qnli", "wnli", "squad", "squad_v2",
                 "wikitext2", "pydocs", "pydocs-embedding"):
        assert name in names
    assert get_task("SST-2").name == "sst2" and get_task("sts-b").main_metric == "spearmanr"
    assert get_task("mrpc").main_metric == "f1" and get_task("rte").head == "sequence-classification"
    squad = get_task("squad")
    assert (squad.kind, squad.head, squad.main_metric, squad.seq_len) == ("squad", "question-answering", "f1", 384)
    wiki = get_task("wikitext2")
    assert (wiki.model_kind, wiki.higher_is_better, wiki.labelled_calibration) == ("causal", False, True)
    lm = get_task("lmeval:hellaswag")
    assert lm.name == "lmeval:hellaswag" and lm.model_kind == "causal"
    assert get_task("squad") is not get_task("squad")  # fresh objects: prepared state never leaks


@pytest.mark.parametrize("name, message", [("sst", "did you mean 'sst2'"), ("wikitext3", "did you mean 'wikitext2'"),
                                           ("lmeval:", "give the lmeval task"), ("nope:x", "unknown task")])
def test_unknown_task_says_did_you_mean(name, message):
    with pytest.raises(ValueError, match="(?i)" + message.replace("(", r"\(")):
        get_task(name)


def test_option_for_the_wrong_task_is_an_error():
    with pytest.raises(ValueError, match="--squad-split does not apply"):
        get_task("sst2", squad_split="dev-articles:train=0-1,eval=2-3")
    assert get_task("squad", squad_split="dev-articles:train=0-1,eval=2-3").split.endswith("eval=2-3")


def test_one_data_dir_resolver(tmp_path, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    with pytest.raises(FileNotFoundError, match="--data-dir DIR or set TSHRINK_DATA_DIR"):
        resolve_data_dir(None, required=True)
    monkeypatch.setenv("TSHRINK_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(tmp_path / "..") == tmp_path / ".."  # --data-dir wins over the environment
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")


def test_glue_calibration_is_labelled_and_seeded(tmp_path):
    from transformers import AutoTokenizer

    task = get_task("sst2")
    task.prepare(glue_dir(tmp_path), need_train=True)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir(tmp_path))
    a = task.calibration(tok, samples=10, seq_len=16, seed=3, batch_size=4)
    b = task.calibration(tok, samples=10, seq_len=16, seed=3, batch_size=4)
    assert a.has_labels and a.n_examples == 10 and len(a.batches) == 3
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a.batches, b.batches))
    assert task.info["eval_examples"] == 6 and task.info["train_examples"] == 24






def test_bad_inputs_fail_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    forbid_model_loading(monkeypatch)
    llama, bert = tiny_llama_dir(tmp_path), tiny_bert_dir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = str(tmp_path / "res")
    cases = [
        (["--task", "sst", "--model", str(bert)], "did you mean 'sst2'"),
        (["--methods", "magnitud", "--model", str(llama)], "did you mean 'magnitude'"),
        (["--task", "sst2", "--model", str(bert), "--data-dir", str(empty)], "SST-2/dev.tsv"),
        (["--task", "sst2", "--model", str(bert), "--data-dir", str(empty)], "Expected layout"),
        (["--task", "sst2", "--model", str(llama), "--data-dir", str(empty)], "needs an encoder"),
        (["--task", "wikitext2", "--model", str(bert)], "needs a decoder"),
        (["--task", "pydocs", "--model", str(llama), "--flops", "0.8,abc"], "'abc' is not a number"),
        (["--task", "pydocs", "--model", str(llama), "--flops", "0.8,1.5"], "outside (0, 1]"),
        (["--model", str(llama), "--opt", "nosuch=1"], "belong to none of the methods"),
        (["--task", "squad", "--model", str(bert), "--data-dir", str(empty)], "ForQuestionAnswering"),
        (["--task", "sst2", "--model", str(tiny_bert_dir(tmp_path, head="base", name="bare"))], "harness finetune"),
        (["--model", str(llama), "--data-dir", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for extra, message in cases:
        rc, err = run_cli(["compare", "--results", res, *extra], capsys)
        assert rc == 2, extra
        assert message.lower() in err.lower(), (extra, err)
    assert not (tmp_path / "res").exists()


def test_finetune_bad_inputs(tmp_path, capsys, monkeypatch):
    forbid_model_loading(monkeypatch)
    llama = tiny_llama_dir(tmp_path)
    rc, err = run_cli(["finetune", "--task", "pydocs", "--model", str(llama), "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and "cannot be fine-tuned" in err
    rc, err = run_cli(["finetune", "--task", "sst2", "--model", str(llama), "--data-dir", str(glue_dir(tmp_path)),
                    "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and "decoder" in err


def test_labels_needed_but_task_has_none(tmp_path, capsys, monkeypatch):
    from tshrink import hookimpl
    from tshrink.manager import get_plugin_manager
    from tshrink.spec import MethodSpec, Recipe, StageSpec
    from tshrink_harness.compare import compare

    class NeedsLabels:
        @hookimpl
        def tshrink_stages(self):
            return [StageSpec("score", "needs-labels-test", "test", needs_calibration=True, needs_labels=True)]

        @hookimpl
        def tshrink_methods(self):
            return [MethodSpec("needs-labels-test", Recipe(score="needs-labels-test", select="global"))]

        @hookimpl
        def tshrink_score(self, name, ctx, options):
            raise AssertionError("never reached: the labels are checked first")

    forbid_model_loading(monkeypatch)
    pm = get_plugin_manager(plugins=[NeedsLabels()])
    bert = tiny_bert_dir(tmp_path, head="base")
    with pytest.raises(ValueError, match="need labelled calibration data"):
        compare(methods="needs-labels-test", model=str(bert), budgets=[0.5], options={}, pm=pm,
                results_dir=str(tmp_path / "r"))


def test_tasks_listing_imports_no_torch():
    out = cli_stdout_without_torch(["tasks"])
    assert "squad_v2" in out and "lmeval:<name>" in out


def test_real_data_tasks_prepare(data_dir):
    """The shared benchmark data in the layouts the tasks expect (skips when absent)."""
    for name, dev, train in (("sst2", 872, 67349), ("mrpc", 408, 3668), ("stsb", 1500, 5749), ("rte", 277, 2490)):
        task = get_task(name)
        task.prepare(data_dir, need_train=True)  # the data root: GLUE sits under glue/
        assert (task.info["eval_examples"], task.info["train_examples"]) == (dev, train), name
    squad = get_task("squad")
    squad.prepare(data_dir, need_train=True)
    assert squad.split == "dev-articles:train=0-23,eval=24-47"
    assert squad.info["eval_examples"] + squad.info["train_examples"] == 10570
    wiki = get_task("wikitext2")
    wiki.prepare(data_dir, need_train=False)
    assert wiki.info["files"]["evaluation"] == "wikitext-2-raw/wiki.test.raw"
    from tshrink_harness.tasks.registry import default_task

    assert default_task("causal", data_dir) == "wikitext2-quick" and default_task("causal", None) == "pydocs"
