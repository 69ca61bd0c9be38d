"""GLUE registry, TSV readers (official + Hugging Face export layouts) and encode_glue.

Real-data checks read $TSHRINK_DATA_DIR (default <repo>/../shared/data) and skip when it
is absent; every other layout is checked on tiny fixture files written in the exact
official format.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from tshrink_harness.tasks.glue import GLUE_TASKS, encode_glue, glue_task, load_glue, read_glue_file

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("TSHRINK_DATA_DIR", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "glue").is_dir(), reason=f"GLUE data not found at {DATA_DIR / 'glue'} (set TSHRINK_DATA_DIR)"
)


def write(path: Path, text: str, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


# ---------------------------------------------------------------- registry
@pytest.mark.parametrize(
    "alias, name",
    [("sst2", "sst2"), ("sst-2", "sst2"), ("SST-2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"),
     ("mnli-mm", "mnli_mismatched"), ("MNLI-M", "mnli_matched"), ("mnli_mismatched", "mnli_mismatched"),
     ("QQP", "qqp"), ("wnli", "wnli")],
)
def test_task_aliases(alias, name):
    assert glue_task(alias).name == name


def test_unknown_task_suggests_and_lists():
    with pytest.raises(ValueError) as err:
        glue_task("sst3")
    msg = str(err.value)
    assert "'sst3'" in msg and "Did you mean 'sst2'" in msg and "cola" in msg and "wnli" in msg


def test_label_order_matches_hf_glue():
    assert GLUE_TASKS["rte"].labels == ("entailment", "not_entailment")
    assert GLUE_TASKS["qnli"].labels == ("entailment", "not_entailment")
    assert GLUE_TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["wnli"].labels == ("not_entailment", "entailment")
    assert GLUE_TASKS["stsb"].labels is None and GLUE_TASKS["stsb"].is_regression
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["cola"].main_metric == "matthews_correlation"
    assert GLUE_TASKS["mrpc"].metrics == ("accuracy", "f1")
    assert glue_task("mnli-mm").files() == {"validation": "MNLI/dev_mismatched.tsv", "test": "MNLI/test_mismatched.tsv"}
    assert GLUE_TASKS["mnli"].files()["validation_matched"] == "MNLI/dev_matched.tsv"
    assert GLUE_TASKS["sst2"].files()["validation"] == "SST-2/dev.tsv"


# ---------------------------------------------------------------- real data
@needs_data
@pytest.mark.parametrize(
    "task, counts",
    [("sst2", (67349, 872, 1821)), ("mrpc", (3668, 408, 1725)), ("stsb", (5749, 1500, 1379)),
     ("rte", (2490, 277, 3000))],
)
def test_real_data_counts(task, counts):
    got = tuple(len(load_glue(task, split, DATA_DIR)) for split in ("train", "validation", "test"))
    assert got == counts


@needs_data
def test_real_data_contents():
    # reference values counted with awk on the files
    sst2 = load_glue("SST-2", "dev", DATA_DIR)
    assert sst2[0] == {"text_a": "it 's a charming and often affecting journey . ", "text_b": None, "label": 1, "idx": 0}
    assert sum(e["label"] for e in sst2) == 444
    mrpc = load_glue("mrpc", "validation", DATA_DIR)
    assert sum(e["label"] for e in mrpc) == 279
    assert mrpc[0]["text_b"].startswith('"The foodservice pie')  # stray quote kept (QUOTE_NONE)
    rte = load_glue("rte", "validation", DATA_DIR)  # *.hf.tsv: 1 = not_entailment
    assert sum(e["label"] for e in rte) == 131 and rte[0]["label"] == 1
    assert rte[0]["text_b"] == "Christopher Reeve had an accident."
    assert all(e["label"] is None for e in load_glue("rte", "test", DATA_DIR))
    stsb = load_glue("sts-b", "validation", DATA_DIR)
    assert stsb[0]["label"] == 5.0 and stsb[-1]["label"] == 0.0
    assert sum(e["label"] for e in stsb) == pytest.approx(3545.8613, abs=1e-3)
    assert all(e["label"] is None for e in load_glue("mrpc", "test", DATA_DIR))


# ---------------------------------------------------------------- official layouts (fixtures)
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
                   "label5\tgold_label\n")


def mnli_row(i, s1, s2, gold):
    return f"{i}\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{s1}\t{s2}\t{gold}\t{gold}\t{gold}\t{gold}\t{gold}\t{gold}\n"


def test_cola_headerless_train_and_test(tmp_path):
    write(tmp_path / "CoLA/train.tsv",
          "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
          "gj04\t0\t*\tThey drank the pub.\n")
    write(tmp_path / "CoLA/test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    train = load_glue("cola", "train", tmp_path)
    assert [(e["text_a"], e["text_b"], e["label"], e["idx"]) for e in train] == [
        ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1, 0),
        ("They drank the pub.", None, 0, 1)]
    assert load_glue("cola", "test", tmp_path) == [
        {"text_a": "Bill whistled past the house.", "text_b": None, "label": None, "idx": 0}]


def test_mnli_matched_and_mismatched(tmp_path):
    write(tmp_path / "MNLI/dev_matched.tsv", MNLI_DEV_HEADER
          + mnli_row(0, "The new rights are nice enough", "Everyone really likes the newest benefits ", "neutral")
          + mnli_row(1, 'He said "yes', "He agreed.", "entailment"))
    write(tmp_path / "MNLI/dev_mismatched.tsv", MNLI_DEV_HEADER + mnli_row(0, "A", "B", "contradiction"))
    write(tmp_path / "MNLI/test_matched.tsv", "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
          "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\n"
          "0\t1\t1n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tP\tH\n")
    matched = load_glue("mnli", "validation_matched", tmp_path)
    assert [e["label"] for e in matched] == [1, 0]  # neutral = 1, entailment = 0
    assert matched[1]["text_a"] == 'He said "yes' and matched[1]["text_b"] == "He agreed."
    assert load_glue("mnli-mm", "dev", tmp_path)[0]["label"] == 2  # contradiction = 2
    assert load_glue("mnli_matched", "validation", tmp_path) == matched
    assert load_glue("mnli", "test_matched", tmp_path)[0] == {"text_a": "P", "text_b": "H", "label": None, "idx": 0}
    with pytest.raises(ValueError, match="validation_matched"):
        load_glue("mnli", "validation", tmp_path)


@pytest.mark.parametrize(
    "task, path, text, expected",
    [
        ("qqp", "QQP/dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
         "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics so beautiful?\t0\n",
         ("Why are African-Americans so beautiful?", "Why are hispanics so beautiful?", 0)),
        ("qnli", "QNLI/dev.tsv", "index\tquestion\tsentence\tlabel\n"
         "0\tWhat came into force after the new constitution?\tThe law came into force.\tnot_entailment\n",
         ("What came into force after the new constitution?", "The law came into force.", 1)),
        ("rte", "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tDana Reeve died.\tReeve had an accident.\tnot_entailment\n"
         "1\tBacteria mutate.\tBacteria win.\tentailment\n",
         ("Dana Reeve died.", "Reeve had an accident.", 1)),
        ("wnli", "WNLI/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged with hair. It has to be cleaned."
         "\tThe hair has to be cleaned.\t0\n", ("The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", 0)),
        ("sst2", "SST-2/dev.tsv", "sentence\tlabel\nit 's a charming journey . \t1\n", ("it 's a charming journey . ", None, 1)),
        ("stsb", "STS-B/dev.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
         "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man is \"dancing.\tA man dances.\t4.750\n",
         ('A man is "dancing.', "A man dances.", 4.75)),
    ],
)
def test_official_layouts(tmp_path, task, path, text, expected):
    write(tmp_path / path, text)
    first = load_glue(task, "validation", tmp_path)[0]
    assert (first["text_a"], first["text_b"], first["label"]) == expected


def test_mrpc_bom_and_test_without_labels(tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(tmp_path / "MRPC/dev.tsv", header + "1\t1355540\t1355592\tHe said \"pie.\tPie fits.\n0\t1\t2\tA\tB\n", bom=True)
    write(tmp_path / "MRPC/test.tsv", "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tC\tD\n", bom=True)
    dev = load_glue("mrpc", "dev", tmp_path)
    assert [(e["text_a"], e["text_b"], e["label"]) for e in dev] == [('He said "pie.', "Pie fits.", 1), ("A", "B", 0)]
    assert load_glue("mrpc", "test", tmp_path)[0]["label"] is None


def test_hf_export_layout_and_data_dir_with_glue_folder(tmp_path):
    write(tmp_path / "glue/MNLI/dev_matched.hf.tsv", "premise\thypothesis\tlabel\tidx\nP0\tH0\t2\t0\nP1\tH1\t-1\t1\n")
    write(tmp_path / "glue/STS-B/train.hf.tsv", "sentence1\tsentence2\tlabel\tidx\nA\tB\t3.8\t0\n")
    rows = load_glue("mnli", "dev_matched", tmp_path)
    assert rows == [{"text_a": "P0", "text_b": "H0", "label": 2, "idx": 0},
                    {"text_a": "P1", "text_b": "H1", "label": None, "idx": 1}]
    assert load_glue("stsb", "train", tmp_path)[0]["label"] == pytest.approx(3.8)
    # the official file wins over the export when both exist
    write(tmp_path / "glue/MNLI/dev_matched.tsv", MNLI_DEV_HEADER + mnli_row(0, "X", "Y", "entailment"))
    assert load_glue("mnli", "dev_matched", tmp_path)[0]["text_a"] == "X"


def test_missing_file_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_glue("qqp", "validation", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "QQP" / "dev.tsv") in msg and "dev.hf.tsv" in msg
    assert "question1\\tquestion2\\tlabel\\tidx" in msg


def test_bad_inputs(tmp_path):
    write(tmp_path / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="'maybe'.*entailment"):
        load_glue("rte", "validation", tmp_path)
    write(tmp_path / "QNLI/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['question', 'sentence'\]"):
        load_glue("qnli", "validation", tmp_path)
    with pytest.raises(ValueError, match="Unknown split 'eval'"):
        load_glue("rte", "eval", tmp_path)


def test_corrupted_rows_are_skipped_like_hf(tmp_path):
    path = tmp_path / "QQP/train.tsv"
    write(path, "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tQ1\tQ2\t1\n1\t3\t4\tonly one question\n"
          "2\t5\t6\tQ5\tQ6\t0\n")
    with pytest.warns(UserWarning, match="skipped 1 row"):
        rows = read_glue_file(str(path), "qqp")
    assert [(e["text_a"], e["label"], e["idx"]) for e in rows] == [("Q1", 1, 0), ("Q5", 0, 2)]


def test_online_path_converts_hf_rows(monkeypatch):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"premise": "P", "hypothesis": "H", "label": 1, "idx": 7},
                {"premise": "Q", "hypothesis": "I", "label": -1, "idx": 8}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    rows = load_glue("MNLI", "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert rows == [{"text_a": "P", "text_b": "H", "label": 1, "idx": 7},
                    {"text_a": "Q", "text_b": "I", "label": None, "idx": 8}]


# ---------------------------------------------------------------- encode_glue
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "dog", "ran"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def test_encode_single_sentences(tokenizer):
    import torch

    batch = encode_glue([{"text_a": "The cat sat", "text_b": None, "label": 1},
                         {"text_a": "dog zebra", "text_b": None, "label": 0}], tokenizer)
    assert batch["input_ids"].tolist() == [[2, 4, 5, 6, 3], [2, 7, 1, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0] * 5, [0] * 5]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]


def test_encode_pairs_truncation_regression(tokenizer):
    import torch

    batch = encode_glue([{"text_a": "the cat sat dog", "text_b": "ran", "label": 3.5}], tokenizer, max_length=6)
    # longest-first truncation drops two tokens of the longer sentence
    assert batch["input_ids"].tolist() == [[2, 4, 5, 3, 8, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.5]
    padded = encode_glue([{"text_a": "cat", "text_b": "dog", "label": None}], tokenizer, max_length=7, padding="max_length")
    assert padded["input_ids"].tolist() == [[2, 5, 3, 7, 3, 0, 0]] and "labels" not in padded


def test_encode_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="mix sentence pairs"):
        encode_glue([{"text_a": "a", "text_b": "b", "label": 0}, {"text_a": "a", "text_b": None, "label": 0}], tokenizer)
    with pytest.raises(ValueError, match="example 1 has no label"):
        encode_glue([{"text_a": "a", "text_b": None, "label": 0}, {"text_a": "a", "text_b": None, "label": None}], tokenizer)
    with pytest.raises(ValueError, match="empty"):
        encode_glue([], tokenizer)
    with pytest.raises(ValueError, match="padding"):
        encode_glue([{"text_a": "a", "text_b": None, "label": 0}], tokenizer, padding="do_not_pad")
