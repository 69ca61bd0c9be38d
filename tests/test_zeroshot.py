"""The zero-shot suite offline: lm-eval's own task definitions (piqa, arc_easy, ...) with the
dataset redirected to local JSON-lines copies; checked against log-likelihoods computed by
hand with lm-eval's own prompts, plus the suite's bad-input messages."""
from __future__ import annotations

import json

import pytest
import torch

from _harness_fixtures import forbid_model_loading, run_cli, tiny_llama_dir
from _tokenizers import byte_bpe_tokenizer
from test_lmeval import _choice_logprob

PIQA = [{"goal": "to open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        {"goal": "to dry wet hands", "sol1": "use a towel", "sol2": "use a bucket of water", "label": 0},
        {"goal": "to cool soup", "sol1": "heat it", "sol2": "let it stand", "label": 1}]
ARC = [{"id": "a1", "question": "what do plants need", "choices": {"text": ["light", "sand", "noise"],
                                                                   "label": ["A", "B", "C"]}, "answerKey": "A"},
       {"id": "a2", "question": "ice is", "choices": {"text": ["hot", "frozen water"], "label": ["1", "2"]},
        "answerKey": "2"}]


def _data_dir(root, tasks=("piqa", "arc_easy")):
    files = {"piqa": ("validation", PIQA), "arc_easy": ("test", ARC)}
    for name in tasks:
        split, docs = files[name]
        (root / "lm-eval" / name).mkdir(parents=True, exist_ok=True)
        (root / "lm-eval" / name / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    words = [d["goal"] + " " + d["sol1"] + " " + d["sol2"] for d in PIQA] + [a["question"] for a in ARC]
    tok = byte_bpe_tokenizer(words * 3 + ["Question: Answer:"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    return model, tok


def test_local_copy_gives_lm_evals_own_loglikelihoods(tmp_path):
    """Through the harness task (lm-eval's piqa / arc_easy YAMLs, data redirected) every choice's
    log-likelihood equals log p(" " + choice | "Question: <q>\\nAnswer:") computed directly."""
    from tshrink_harness.tasks.lmeval import run_lm_eval
    from tshrink_harness.tasks.registry import get_task

    data = _data_dir(tmp_path / "data")
    task = get_task("lmeval:piqa,arc_easy")
    task.prepare(data, need_train=False)
    assert task.info["documents_available"] == {"piqa": 3, "arc_easy": 2}
    assert task.info["files"] == {"piqa": "lm-eval/piqa/validation.jsonl", "arc_easy": "lm-eval/arc_easy/test.jsonl"}
    model, tok = _tiny()
    res = run_lm_eval(model, tok, task._specs, log_samples=True)
    expected = {"piqa": [("Question: " + d["goal"] + "\nAnswer:", [d["sol1"], d["sol2"]], d["label"]) for d in PIQA],
                "arc_easy": [("Question: " + d["question"] + "\nAnswer:", d["choices"]["text"],
                              d["choices"]["label"].index(d["answerKey"])) for d in ARC]}
    accs = {}
    for name, docs in expected.items():
        samples = sorted(res.raw["samples"][name], key=lambda r: r["doc_id"])
        assert len(samples) == len(docs)
        hits = []
        for (context, choices, label), sample in zip(docs, samples):
            scores = [_choice_logprob(model, tok, context, " " + c) for c in choices]
            assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
            hits.append(max(range(len(scores)), key=scores.__getitem__) == label)
        accs[name] = sum(hits) / len(hits)
    ev = task.evaluate(model, tok, device="cpu", limit=None, seq_len=64, batch_size=2)
    assert ev.metrics["piqa/acc"] == pytest.approx(accs["piqa"])
    assert ev.metrics["arc_easy/acc"] == pytest.approx(accs["arc_easy"])
    assert ev.metrics["mean_acc"] == pytest.approx((ev.metrics["piqa/acc_norm"] + ev.metrics["arc_easy/acc_norm"]) / 2)
    assert [c["column"] for c in ev.info["columns"]] == ["PIQA", "ARC-e"]
    assert ev.info["documents"] == {"piqa": 3, "arc_easy": 2} and ev.info["whole_split"]
    assert ev.info["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x head_dim x fp32


def test_zeroshot_suite_is_lm_evals_five_tasks():
    from tshrink_harness.tasks.registry import get_task

    t = get_task("zeroshot")
    assert t.lm_tasks == ("piqa", "arc_easy", "winogrande", "boolq", "lambada_openai") and t.main_metric == "mean_acc"
    assert get_task("lmeval:piqa, arc_easy").name == "lmeval:piqa,arc_easy"


def test_missing_local_file_says_which_file_where(tmp_path):
    from tshrink_harness.tasks.registry import get_task

    data = _data_dir(tmp_path / "data", tasks=("piqa",))
    with pytest.raises(FileNotFoundError) as err:
        get_task("lmeval:piqa,arc_easy").prepare(data, need_train=False)
    msg = str(err.value)
    assert str(data / "lm-eval" / "arc_easy" / "test.jsonl") in msg and "'test' split of allenai/ai2_arc/ARC-Easy" in msg
    assert "hub" in msg


def test_unknown_lmeval_task_did_you_mean(tmp_path, capsys, monkeypatch):
    forbid_model_loading(monkeypatch)
    data = _data_dir(tmp_path / "data")
    rc, err = run_cli(["compare", "--model", str(tiny_llama_dir(tmp_path)), "--task", "lmeval:piqa,arc_eazy",
                       "--data-dir", str(data), "--methods", "magnitude", "--seq-len", "16", "--results", str(tmp_path / "r")], capsys)
    assert rc == 2 and "unknown lm-eval task 'arc_eazy'" in err and "did you mean 'arc_easy'" in err.lower()


def test_compare_records_per_task_columns_and_caps_eval_samples(tmp_path, capsys, monkeypatch):
    from tshrink_harness.cli import main

    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    data = _data_dir(tmp_path / "data")
    results = tmp_path / "results"
    argv = ["compare", "--model", str(tiny_llama_dir(tmp_path)), "--task", "lmeval:piqa,arc_easy", "--data-dir",
            str(data), "--methods", "magnitude", "--flops", "0.5", "--seq-len", "16", "--calib-samples", "4",
            "--eval-samples", "3", "--results", str(results), "--latency-warmup", "0", "--latency-repeats", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "--eval-samples 3 is more than arc_easy's 2 documents" in err
    recs = [json.loads(f.read_text()) for f in sorted((results / "runs").rglob("*.json"))]
    assert len(recs) == 2
    for rec in recs:
        ev = rec["evaluation"]
        assert rec["main_metric"] == "mean_acc" and 0 <= rec["metrics"]["mean_acc"] <= 1
        assert ev["limit"] == 3 and ev["capped"] == ["arc_easy"] and ev["documents"] == {"piqa": 3, "arc_easy": 2}
        assert rec["settings"]["eval_samples"] == 3
    board = (results / "LEADERBOARD.md").read_text()
    assert "| PIQA" in board and "ARC-e" in board and "mean" in board


def test_perplexity_plus_zeroshot_suite_from_one_prune(tmp_path, capsys, monkeypatch):
    """--task wikitext2+lmeval:piqa,arc_easy: one prune per run, both evaluations in one record
    and in the papers' table (accuracy columns, their mean, WikiText-2 perplexity)."""
    from test_wikitext import _wiki_dir
    from tshrink_harness.cli import main

    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    data = _data_dir(_wiki_dir(tmp_path / "data"))
    results = tmp_path / "results"
    argv = ["compare", "--model", str(tiny_llama_dir(tmp_path)), "--task", "wikitext2+lmeval:piqa,arc_easy",
            "--data-dir", str(data), "--methods", "flap", "--flops", "0.6", "--seq-len", "32", "--calib-samples", "4",
            "--results", str(results), "--latency-warmup", "0", "--latency-repeats", "1"]
    assert main(argv) == 0
    recs = [json.loads(f.read_text()) for f in sorted((results / "runs").rglob("*.json"))]
    assert len(recs) == 2
    for rec in recs:
        m = rec["metrics"]
        assert {"wikitext2/perplexity", "wikitext2/nll", "piqa/acc", "arc_easy/acc_norm", "mean_acc"} <= set(m)
        assert rec["main_metric"] == "mean_acc" and rec["task"]["name"] == "wikitext2+lmeval:piqa,arc_easy"
        assert rec["evaluation"]["parts"]["wikitext2"]["protocol"] == "standard"
        assert rec["calibration"] is None or rec["calibration"]["source"].startswith("wikitext-2:valid")
    board = (results / "LEADERBOARD.md").read_text()
    assert "| WikiText-2 ppl" in board.replace("|  ", "| ") or "WikiText-2 ppl" in board
    assert "protocol 'standard'" in board
    plots = sorted(f.name for f in (results / "plots").glob("*.png"))
    assert len(plots) == 2 and plots[0].endswith("-wikitext2-ppl.png")  # mean accuracy and perplexity vs FLOPs
