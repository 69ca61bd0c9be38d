"""Evaluation of a model larger than the device through accelerate's device_map dispatch
(harness/dispatch.py), on the CPU with a tiny model and a forced small max memory (disk offload):
the same perplexity as the plain path, the model unchanged afterwards; offload inside compare."""
from __future__ import annotations

import json

import pytest
import torch

from _harness_fixtures import tiny_llama_dir
from tshrink.testing import tiny_model, tiny_tokenizer
from tshrink_harness.cli import main
from tshrink_harness.dispatch import dispatched, parse_max_memory
from tshrink_harness.tasks.wikitext import perplexity

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def _bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_disk_offloaded_perplexity_equals_the_plain_path_and_the_model_is_restored():
    tok = tiny_tokenizer("llama")
    model = tiny_model("llama", head="causal-lm", vocab_size=len(tok))
    ref = perplexity(model, tok, TEXT, seq_len=16, max_windows=4, batch_size=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with dispatched(model, "sequential", {"cpu": int(0.8 * _bytes(model))}) as info:
        assert info["disk_modules"] and "cpu" in info["device_map"].values()
        got = perplexity(model, tok, TEXT, seq_len=16, max_windows=4, batch_size=2)
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-6) and got.n_tokens == ref.n_tokens
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)
    assert not hasattr(model, "hf_device_map")


def test_max_memory_values():
    assert parse_max_memory("0=1GiB,cpu=2GiB") == {0: 2**30, "cpu": 2 * 2**30}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("gpu=1GiB")
    tok = tiny_tokenizer("llama")
    model = tiny_model("llama", head="causal-lm", vocab_size=len(tok))
    with pytest.raises(ValueError, match="largest block"):
        with dispatched(model, "sequential", {"cpu": 16}):
            pass


def _ppl_records(results):
    return {r["method"]: r for r in (json.loads(p.read_text()) for p in (results / "runs").rglob("*.json"))}


def test_compare_with_eval_device_map_and_offload_gives_the_plain_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model = tiny_llama_dir(tmp_path)
    from tshrink.models import load_model

    net, _ = load_model(str(model))
    cpu = int(0.8 * _bytes(net))
    base = ["compare", "--model", str(model), "--methods", "stat", "--flops", "0.6", "--seq-len", "16",
            "--calib-samples", "4", "--eval-samples", "2", "--latency-warmup", "0", "--latency-repeats", "1",
            "--latency-min-time", "0.001", "--gen-tokens", "0", "--no-leaderboard", "--reference", "none"]
    assert main(base + ["--results", str(tmp_path / "plain")]) == 0
    assert main(base + ["--results", str(tmp_path / "mapped"), "--eval-device-map", "sequential",
                        "--eval-max-memory", f"cpu={cpu}"]) == 0
    assert main(base + ["--results", str(tmp_path / "offload"), "--offload", "always"]) == 0
    plain, mapped, off = (_ppl_records(tmp_path / d) for d in ("plain", "mapped", "offload"))
    for method in ("dense", "stat"):
        want = plain[method]["metrics"]["perplexity"]
        assert mapped[method]["metrics"]["perplexity"] == pytest.approx(want, rel=1e-5)
        assert off[method]["metrics"]["perplexity"] == pytest.approx(want, rel=1e-5)
        assert mapped[method]["evaluation"]["dispatch"]["disk_modules"]
        assert off[method]["latency"] == {"skipped": "the model does not fit on the device (layer offload): not timed"}
    assert off["stat"]["prune"]["stages"]["stat:correct"]  # pruned with the layers streamed
    assert mapped["stat"]["settings"]["eval_device_map"] == {"map": "sequential", "max_memory": f"cpu={cpu}"}


@pytest.mark.parametrize("extra, message", [
    (["--eval-device-map", "everywhere"], "--eval-device-map 'everywhere' is not one of none, auto"),
    (["--eval-max-memory", "cpu=1GiB"], "--eval-max-memory needs --eval-device-map"),
    (["--eval-device-map", "auto", "--eval-max-memory", "x"], "--eval-max-memory 'x'"),
])
def test_bad_dispatch_options_are_one_line(tmp_path, capsys, monkeypatch, extra, message):
    model = tiny_llama_dir(tmp_path)
    capsys.readouterr()
    code = main(["compare", "--model", str(model), "--methods", "magnitude", "--results", str(tmp_path / "r"),
                 "--no-leaderboard", *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_lm_eval_on_a_disk_offloaded_model_gives_the_plain_loglikelihoods(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_lmeval import DOCS, TASK_YAML
    from _tokenizers import byte_bpe_tokenizer
    from tshrink_harness.tasks.lmeval import run_lm_eval

    data_file = tmp_path / "docs.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data_file=data_file))
    tok = byte_bpe_tokenizer([d["question"] + " " + " ".join(d["choices"]) for d in DOCS] * 3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    kw = {"include_path": tmp_path / "tasks", "limit": 4, "log_samples": True}

    def lls(res):
        rows = sorted(res.raw["samples"]["tshrink_tiny_mc"], key=lambda r: r["doc_id"])
        return [ll for r in rows for ll, _ in r["filtered_resps"]]

    plain = run_lm_eval(model, tok, ["tshrink_tiny_mc"], **kw)
    with dispatched(model, "sequential", {"cpu": int(0.8 * _bytes(model))}) as info:
        assert info["disk_modules"]
        mapped = run_lm_eval(model, tok, ["tshrink_tiny_mc"], **kw)
    assert lls(mapped) == pytest.approx(lls(plain), abs=1e-5)
    assert mapped.metrics["tshrink_tiny_mc"]["acc,none"] == plain.metrics["tshrink_tiny_mc"]["acc,none"]
