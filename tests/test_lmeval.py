"""lm-eval adapter: a local (offline) multiple-choice task on a tiny random Llama, checked
against log-likelihoods computed directly with the model."""
from __future__ import annotations

import json

import pytest
import torch

from tshrink_harness.tasks.lmeval import run_lm_eval

from _tokenizers import byte_bpe_tokenizer

DOCS = [
    {"question": "the quick brown fox", "choices": ["jumps", "sleeps", "runs"], "label": 0},
    {"question": "a stitch in time", "choices": ["saves nine", "saves ten"], "label": 0},
    {"question": "every cloud has a", "choices": ["silver lining", "gold lining"], "label": 1},
    {"question": "the lazy", "choices": ["dog", "cat", "fox"], "label": 2},
    {"question": "over the", "choices": ["dog", "moon"], "label": 1},  # beyond limit=4
]
TASK_YAML = """\
task: tshrink_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _choice_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens the way lm-eval does for causal
    models: encode context and context + continuation, continuation = the extra tokens."""
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    ids = torch.tensor([ctx + cont])  # (1, seq)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (seq-1, vocab)
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_local_multiple_choice_task_matches_direct_loglikelihoods(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    data_file = tmp_path / "docs.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny_mc.yaml").write_text(TASK_YAML.format(data_file=data_file))

    tok = byte_bpe_tokenizer([d["question"] + " " + " ".join(d["choices"]) for d in DOCS] * 3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()

    res = run_lm_eval(model, tok, ["tshrink_tiny_mc"], include_path=task_dir, limit=4,
                      log_samples=True)
    acc = res.metrics["tshrink_tiny_mc"]["acc,none"]
    assert res.n_samples == {"tshrink_tiny_mc": 4}
    assert 0.0 <= acc <= 1.0
    # reference: log p(" " + choice | question) per choice, argmax vs label, first 4 docs
    samples = sorted(res.raw["samples"]["tshrink_tiny_mc"], key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in samples] == [0, 1, 2, 3]
    hits = []
    for doc, sample in zip(DOCS, samples):
        scores = [_choice_logprob(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        assert [ll for ll, _greedy in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert acc == pytest.approx(sum(hits) / len(hits))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        run_lm_eval(torch.nn.Linear(1, 1), None, "tshrink_tiny_mc")
    with pytest.raises(ValueError, match="do not exist"):
        run_lm_eval(torch.nn.Linear(1, 1), None, ["x"], include_path=tmp_path / "nope")
