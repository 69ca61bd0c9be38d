"""The ``translation`` harness task on a tiny random Marian: listing, data layout errors,
split and calibration, `harness compare` end to end (records, dense row, resume), and the
up-front errors for structured methods and wrong-kind tasks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _harness_fixtures import forbid_model_loading, run_cli
from test_translation import PAIRS, tiny_marian, word_tokenizer
from tshrink_harness.cli import main
from tshrink_harness.tasks.registry import config_kind, get_task

MORE = [("the dog sits in the park .", "der hund sitzt im park ."),
        ("we drink tea today .", "wir trinken heute tee ."),
        ("the book is good .", "das buch ist gut .")]
DATA = PAIRS + MORE  # 8 pairs: lines 1-4 calibrate, lines 5-8 are evaluated
QUICK = dict(latency_warmup=0, latency_repeats=1, seq_len=32, batch_size=4)


def tiny_marian_dir(root: Path) -> Path:
    """A tiny random MarianMTModel + word-level tokenizer, saved like a user's model directory."""
    tok = word_tokenizer([t for pair in DATA for t in pair])
    path = root / "tiny-marian"
    tiny_marian(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_pairs(root: Path, pairs: list[tuple[str, str]], *, prefix: str = "") -> Path:
    """<root>/translation/{prefix}source.txt + {prefix}reference.txt; returns <root>."""
    folder = root / "translation"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}source.txt").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (folder / f"{prefix}reference.txt").write_text("".join(r + "\n" for _, r in pairs), encoding="utf-8")
    return root


@pytest.fixture()
def no_env(monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)




def test_translation_is_a_listed_task(capsys):
    assert main(["tasks", "--json"]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)}
    row = rows["translation"]
    assert (row["model"], row["head"], row["main"]) == ("seq2seq", "seq2seq-lm", "bleu")
    assert "translation/source.txt" in row["data"] and "train.source.txt" in row["data"]
    task = get_task("WMT")
    assert task.name == "translation" and get_task("bleu").name == "translation"
    assert (task.num_beams, task.higher_is_better, task.labelled_calibration) == (1, True, True)  # greedy default
    assert get_task("translation", num_beams=4, max_new_tokens=32).num_beams == 4
    with pytest.raises(ValueError, match="--num-beams must be an integer >= 1"):
        get_task("translation", num_beams=0)
    with pytest.raises(ValueError, match="--num-beams does not apply to task 'sst2'"):
        get_task("sst2", num_beams=4)


def test_config_kind_knows_encoder_decoders():
    from transformers import BertConfig, LlamaConfig, MarianConfig

    assert [config_kind(c) for c in (MarianConfig(), BertConfig(), LlamaConfig())] == ["seq2seq", "encoder", "causal"]


def test_missing_files_name_the_file_and_the_layout(tmp_path, no_env):
    task = get_task("translation")
    with pytest.raises(FileNotFoundError, match="--data-dir DIR or set TSHRINK_DATA_DIR.*Expected layout"):
        task.prepare(None, need_train=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no source file .*translation/source\.txt.*Expected layout"):
        task.prepare(empty, need_train=False)
    data = write_pairs(tmp_path / "d", DATA)
    (data / "translation" / "reference.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no reference file .*translation/reference\.sgm"):
        task.prepare(data, need_train=False)
    data = write_pairs(tmp_path / "d", DATA)
    (data / "translation" / "train.source.txt").write_text("a\n", encoding="utf-8")  # half a train pair
    with pytest.raises(FileNotFoundError, match=r"train pair.*no train reference file.*train\.reference\.txt"):
        task.prepare(data, need_train=True)
    one = write_pairs(tmp_path / "one", DATA[:1])
    with pytest.raises(ValueError, match="at least 2"):
        task.prepare(one, need_train=False)


def test_split_calibration_and_hash(tmp_path, no_env):
    data = write_pairs(tmp_path / "d", DATA)
    task = get_task("translation")
    task.prepare(data, need_train=False)
    assert task.info["split"] == "translation:eval (lines 5-8)" and task.info["eval_sentences"] == 4
    assert task.info["calibration"] == "translation:calibration (lines 1-4)"
    tok = word_tokenizer([t for pair in DATA for t in pair])
    calib = task.calibration(tok, samples=3, seq_len=16, seed=1, batch_size=2)
    assert calib.has_labels and calib.n_examples == 3 and len(calib.batches) == 2
    assert calib.describe()["source"].startswith("translation:calibration (lines 1-4)")
    again = task.calibration(tok, samples=3, seq_len=16, seed=1, batch_size=2)
    assert all((a["labels"] == b["labels"]).all() for a, b in zip(calib.batches, again.batches))
    calib_srcs = {tok.decode(row, skip_special_tokens=True) for b in calib.batches for row in b["input_ids"]}
    assert calib_srcs <= {s for s, _ in DATA[:4]}  # never the evaluated lines
    beams = get_task("translation", num_beams=3)
    beams.prepare(data, need_train=False)
    assert beams.info["data_hash"] != task.info["data_hash"]  # decoding settings never share records
    write_pairs(data, MORE, prefix="train.")  # a separate train pair: every test line is evaluated
    task.prepare(data, need_train=True)
    assert task.info["split"] == "translation:eval (lines 1-8)" and task.info["calibration_sentences"] == 3
    assert task.info["files"]["train source"] == "translation/train.source.txt"


def test_compare_kmeans_and_bs_flex_on_tiny_marian(tmp_path, capsys, no_env):
    from tshrink_harness.compare import compare

    model, data, results = tiny_marian_dir(tmp_path), write_pairs(tmp_path / "data", DATA), tmp_path / "results"
    kw = dict(methods="kmeans,bs-flex", model=str(model), task="translation", data_dir=str(data), budgets=[1.0],
              options={"quant_scope": "attention", "quant_flex_steps": "2"}, results_dir=str(results),
              max_new_tokens=6, **QUICK)
    recs = compare(**kw)
    out = capsys.readouterr().out
    assert sorted(r["method"] for r in recs) == ["bs-flex", "dense", "kmeans"]
    files = sorted((results / "runs").rglob("*.json"))
    assert len(files) == 3
    by = {r["method"]: r for r in map(json.loads, (f.read_text() for f in files))}
    for rec in by.values():
        assert rec["main_metric"] == "bleu" and 0 <= rec["metrics"]["bleu"] <= 100
        assert rec["task"]["name"] == "translation" and rec["task"]["split"] == "translation:eval (lines 5-8)"
        ev = rec["evaluation"]
        assert (ev["sentences"], ev["lines"], ev["decoding"], ev["max_new_tokens"]) == (4, "5-8", "greedy", 6)
        assert rec["model"]["architecture"] == "MarianMTModel"
        assert rec["flops"]["fvcore"] is None and rec["flops"]["kept"] == 1.0  # no adapter: no fvcore count
        lat = rec["latency"]["pruned"]
        assert lat["median_ms"] > 0 and lat["seq_len"] == 32 and lat["decoder_seq_len"] == 32
        assert rec["size"]["bytes"] > 0
    assert by["dense"]["size"]["bits_per_weight"] == 32 and by["dense"]["calibration"] is None
    for name in ("kmeans", "bs-flex"):  # bits as the transform reports them (tiny rows: codebooks dominate)
        assert by[name]["size"]["bits_per_weight"] == by[name]["prune"]["transforms"][name]["bits_per_weight"]
    assert by["bs-flex"]["size"]["bits_per_weight"] == 5 and by["bs-flex"]["size"]["compression_ratio"] > 1
    assert by["bs-flex"]["calibration"]["source"].startswith("translation:calibration (lines 1-4)")
    assert by["bs-flex"]["prune"]["transforms"]["bs-flex"]["recovery"]["loss"] == "labels"
    assert "| dense" in out and "| kmeans" in out and "translation:eval (lines 5-8)" in out
    board = (results / "LEADERBOARD.md").read_text()
    assert "## translation" in board and "`bleu` (higher is better)" in board
    # a second call (an interrupted compare resumed) skips every record and writes nothing
    before = {f: f.stat().st_mtime_ns for f in files}
    again = compare(**kw)
    out = capsys.readouterr().out
    assert out.count("[skip]") == 2 and "[run]" not in out and len(again) == 3
    assert {f: f.stat().st_mtime_ns for f in sorted((results / "runs").rglob("*.json"))} == before


@pytest.mark.parametrize("method", ["magnitude", "stat", "fisher", "stat-kmeans"])
def test_structured_method_on_marian_fails_before_work(tmp_path, capsys, monkeypatch, no_env, method):
    forbid_model_loading(monkeypatch)
    model, data = tiny_marian_dir(tmp_path), write_pairs(tmp_path / "data", DATA)
    rc, err = run_cli(["compare", "--methods", f"kmeans,{method}", "--model", str(model), "--task", "translation",
                    "--data-dir", str(data), "--results", str(tmp_path / "res")], capsys)
    assert rc == 2 and f"['{method}']" in err and "architecture adapter" in err, err
    assert "(marian) has none" in err and "kmeans" in err.split("work on it:")[1]
    rc, err = run_cli(["prune", "--method", method, "--flops", "0.5", "--model", str(model), "--task", "translation",
                    "--data-dir", str(data), "--output", str(tmp_path / "out")], capsys)
    assert rc == 2 and "architecture adapter" in err
    assert not (tmp_path / "res").exists() and not (tmp_path / "out").exists()


def test_wrong_kind_of_model_or_task_is_a_clear_error(tmp_path, capsys, monkeypatch, no_env):
    from _harness_fixtures import tiny_llama_dir

    forbid_model_loading(monkeypatch)
    marian, llama, data = tiny_marian_dir(tmp_path), tiny_llama_dir(tmp_path), write_pairs(tmp_path / "data", DATA)
    cases = [
        (["--task", "pydocs", "--model", str(marian)], "needs a decoder (causal LM)"),
        (["--task", "wikitext2", "--model", str(marian)], "is an encoder-decoder (seq2seq) model. Tasks for it: translation"),
        (["--task", "sst2", "--model", str(marian)], "needs an encoder"),
        (["--task", "pydocs-embedding", "--model", str(marian)], "Tasks for it: translation"),
        (["--task", "lmeval:hellaswag", "--model", str(marian)], "needs a decoder"),
        (["--task", "translation", "--model", str(llama), "--data-dir", str(data)], "needs an encoder-decoder (seq2seq)"),
        (["--task", "translation", "--data-dir", str(data)], "pass --model DIR"),
        (["--model", str(marian), "--seq-len", "32"], "needs local parallel text"),  # seq2seq default task: translation
        (["--task", "pydocs", "--model", str(llama), "--num-beams", "2"], "--num-beams does not apply"),
    ]
    for extra, message in cases:
        rc, err = run_cli(["compare", "--methods", "kmeans", "--results", str(tmp_path / "res"), *extra], capsys)
        assert rc == 2, extra
        assert message.lower() in err.lower(), (extra, err)
    assert not (tmp_path / "res").exists()
