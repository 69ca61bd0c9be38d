"""Tiny local models and data for the harness tests (offline, a few seconds each)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

LM_TEXT = ("the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
           "every cloud has a silver lining . ") * 40

SST2_TRAIN = [("a great and moving film", 1), ("dull , flat and lifeless", 0), ("a joy to watch", 1),
              ("the plot is a mess", 0), ("warm , funny and wise", 1), ("tedious and far too long", 0),
              ("one of the best of the year", 1), ("a waste of a good cast", 0)] * 3
SST2_DEV = [("a moving and funny film", 1), ("flat and tedious", 0), ("the best cast", 1),
            ("a lifeless mess", 0), ("warm and wise", 1), ("far too dull", 0)]


def tiny_llama_dir(root: Path) -> Path:
    """A tiny GQA Llama causal LM + byte-level BPE tokenizer, saved like a user's model dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from _tokenizers import byte_bpe_tokenizer

    tok = byte_bpe_tokenizer([LM_TEXT])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def glue_dir(root: Path) -> Path:
    """<root>/glue-data/SST-2/{train,dev}.tsv in the official GLUE layout."""
    folder = root / "glue-data" / "SST-2"
    folder.mkdir(parents=True)
    for name, rows in (("train", SST2_TRAIN), ("dev", SST2_DEV)):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in rows]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "glue-data"


def tiny_bert_dir(root: Path, *, head: str = "sequence-classification", name: str = "tiny-bert") -> Path:
    """A tiny BERT (classifier head or bare backbone) + WordPiece tokenizer over the fixture words."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from _tokenizers import wordpiece_tokenizer

    path = root / name
    path.mkdir(parents=True)
    tok = wordpiece_tokenizer([s for s, _ in SST2_TRAIN + SST2_DEV], path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=128, num_labels=2)
    model = BertForSequenceClassification(config) if head == "sequence-classification" else BertModel(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def squad_dir(root: Path, n_articles: int = 4) -> Path:
    """<root>/squad-data/squad/dev-v1.1.rebuilt.json: tiny articles in the official layout."""
    import json

    data = []
    for a in range(n_articles):
        context = f"the fox number {a} jumps over the lazy dog . the cat sleeps on the mat ."
        qas = [{"id": f"{a}-0", "question": "what does the fox jump over ?",
                "answers": [{"text": "the lazy dog", "answer_start": context.index("the lazy dog")}]},
               {"id": f"{a}-1", "question": "where does the cat sleep ?",
                "answers": [{"text": "on the mat", "answer_start": context.index("on the mat")}]}]
        data.append({"title": f"article {a}", "paragraphs": [{"context": context, "qas": qas}]})
    path = root / "squad-data" / "squad" / "dev-v1.1.rebuilt.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return root / "squad-data"


def tiny_bert_qa_dir(root: Path) -> Path:
    from transformers import BertConfig, BertForQuestionAnswering

    from _tokenizers import wordpiece_tokenizer

    path = root / "tiny-bert-qa"
    path.mkdir(parents=True)
    tok = wordpiece_tokenizer(["the fox number jumps over the lazy dog . the cat sleeps on the mat what does "
                               "where ? 0 1 2 3"], path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=128)
    BertForQuestionAnswering(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``harness`` in-process: (exit code, stderr); argparse's own exits count as code 2."""
    from tshrink_harness.cli import main

    try:
        rc = main(argv)
    except SystemExit as exit_:
        return 2, str(exit_)
    return rc, capsys.readouterr().err


def forbid_model_loading(monkeypatch) -> None:
    """Make any model load fail the test: input errors must come before the work."""
    import tshrink.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(tshrink.models, "load_model", boom)


def cli_stdout_without_torch(argv: list[str]) -> str:
    """Run ``harness <argv>`` in a fresh interpreter, assert it never imported torch; its stdout."""
    code = (f"import sys; from tshrink_harness.cli import main; main({argv!r});"
            f"assert 'torch' not in sys.modules, 'torch imported by harness {' '.join(argv)}'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout
