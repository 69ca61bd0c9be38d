"""WikiText-2 perplexity protocol: rows, windows, and NLL against the model's own loss."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from tshrink_harness.tasks import wikitext

from _tokenizers import byte_bpe_tokenizer

SYNTH = ("the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
         "every cloud has a silver lining . ") * 12


def _tiny_llama(vocab_size: int, max_pos: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_pos)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer([SYNTH])


def test_rows_rebuilt_like_hf_wikitext():
    text = " \n = Title = \n \n Body line one . \n\n Last , no newline"
    rows = wikitext.hf_rows_from_lines(text)
    assert rows == ["", " = Title = \n", "", " Body line one . \n", "", " Last , no newline"]


def test_perplexity_equals_mean_of_model_losses(tok):
    model = _tiny_llama(len(tok))
    ids = tok(SYNTH, return_tensors="pt").input_ids[0]
    seq_len = 32
    expected_windows = ids.numel() // seq_len
    assert expected_windows >= 4
    res = wikitext.perplexity(model, tok, SYNTH, seq_len=seq_len, batch_size=3)
    # hand computation: HF's loss is the mean CE over the seq_len-1 shifted targets
    with torch.no_grad():
        losses = [model(input_ids=ids[w * seq_len:(w + 1) * seq_len][None],
                        labels=ids[w * seq_len:(w + 1) * seq_len][None]).loss.item()
                  for w in range(expected_windows)]
    nll = sum(losses) / len(losses)
    assert res.n_windows == expected_windows and res.n_text_tokens == ids.numel()
    assert res.n_tokens == expected_windows * (seq_len - 1)
    assert res.seq_len == res.stride == seq_len
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    # SparseGPT's formula: exp(sum(loss * seqlen) / (nsamples * seqlen)) is the same number
    assert res.ppl == pytest.approx(math.exp(sum(l * seq_len for l in losses) / (len(losses) * seq_len)),
                                    rel=1e-5)
    capped = wikitext.perplexity(model, tok, SYNTH, seq_len=seq_len, max_windows=2)
    assert capped.n_windows == 2 and capped.nll == pytest.approx(sum(losses[:2]) / 2, rel=1e-5)


def test_window_errors(tok):
    model = _tiny_llama(len(tok), max_pos=64)
    with pytest.raises(ValueError, match="fewer than one window"):
        wikitext.perplexity(model, tok, "the fox", seq_len=16)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        wikitext.perplexity(model, tok, SYNTH, seq_len=128)
    with pytest.raises(ValueError, match="seq_len=1"):
        wikitext.perplexity(model, tok, SYNTH, seq_len=1)


def test_calibration_windows_deterministic(tok):
    a = wikitext.calibration_windows(tok, SYNTH, n_samples=4, seq_len=16, seed=3)
    b = wikitext.calibration_windows(tok, SYNTH, n_samples=4, seq_len=16, seed=3)
    ids = tok(SYNTH, return_tensors="pt").input_ids[0]
    assert a.shape == (4, 16) and torch.equal(a, b)
    for row in a:  # every window is a contiguous slice of the tokenized text
        assert any(torch.equal(row, ids[s:s + 16]) for s in range(ids.numel() - 15))


def test_real_wikitext_files(tok, data_dir):
    raw = data_dir / wikitext.RAW_TEST_FILE
    if not raw.exists():
        pytest.skip(f"WikiText-2 raw test file not found at {raw} (set TSHRINK_DATA_DIR)")
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    assert digest.startswith("173c87a5") and digest.endswith("dd08")  # canonical file
    rows = wikitext.wikitext2_test_rows(data_dir)
    assert len(rows) == 4358  # rows of HF wikitext-2-raw-v1 "test"
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert sum(r == "" for r in rows) == 1467 and all(r.endswith("\n") for r in rows if r)
    text = wikitext.wikitext2_test_text(data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert len(text) == sum(map(len, rows)) + 2 * (len(rows) - 1)
    res = wikitext.wikitext2_perplexity(_tiny_llama(len(tok)), tok, data_dir=data_dir, seq_len=64, max_windows=2)
    assert res.n_windows == 2 and math.isfinite(res.ppl) and res.ppl > 1
    calib = wikitext.calibration_text(data_dir, max_chars=5000)
    assert len(calib) == 5000 and "<unk>" in calib


def _wiki_dir(root):
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-tokens").mkdir()
    lines = [" = Title = ", " " + SYNTH, " ", " " + SYNTH[::-1]] * 4
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(lines) + "\n")
    (root / "wikitext-2-tokens" / "wiki.valid.tokens").write_text(" " + SYNTH + "\n")
    return root


def test_standard_protocol_covers_the_whole_joined_test_split_once(tmp_path, tok):
    """wikitext2 = the papers' protocol: every full window of the once-tokenized "\\n\\n"-joined
    test rows, mean NLL over all of them; the record names the protocol."""
    from tshrink_harness.tasks.registry import get_task

    data = _wiki_dir(tmp_path)
    task = get_task("wikitext2")
    assert (task.seq_len, task.eval_samples, task.protocol) == (2048, None, "standard")
    task.prepare(data, need_train=False)
    model = _tiny_llama(len(tok))
    ev = task.evaluate(model, tok, device="cpu", limit=None, seq_len=32, batch_size=4)
    text = "\n\n".join(wikitext.hf_rows_from_lines((data / "wikitext-2-raw" / "wiki.test.raw").read_text()))
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // 32
    with torch.no_grad():
        losses = [model(input_ids=ids[w * 32:(w + 1) * 32][None], labels=ids[w * 32:(w + 1) * 32][None]).loss.item()
                  for w in range(n)]
    assert ev.metrics["nll"] == pytest.approx(sum(losses) / n, rel=1e-5)
    assert ev.info["windows"] == n and ev.info["whole_split"] and ev.info["protocol"] == "standard"
    assert "deviation" not in ev.info
    part = task.evaluate(model, tok, device="cpu", limit=2, seq_len=32, batch_size=4)
    assert part.info["deviation"].startswith(f"only the first 2 of {n} windows")
    quick = get_task("wikitext2-quick")
    assert (quick.seq_len, quick.eval_samples, quick.protocol) == (256, 16, "quick")


def test_context_shorter_than_seq_len_is_refused_with_its_maximum(tmp_path, capsys, monkeypatch):
    from _harness_fixtures import forbid_model_loading, run_cli, tiny_llama_dir

    forbid_model_loading(monkeypatch)
    data = _wiki_dir(tmp_path / "data")
    base = ["compare", "--model", str(tiny_llama_dir(tmp_path)), "--task", "wikitext2", "--data-dir", str(data),
            "--methods", "magnitude", "--results", str(tmp_path / "r")]
    rc, err = run_cli(base, capsys)  # default 2048 > the tiny model's 64 positions
    assert rc == 2 and "task 'wikitext2''s default sequence length 2048" in err and "max_position_embeddings is 64" in err
    rc, err = run_cli(base + ["--seq-len", "65"], capsys)
    assert rc == 2 and "--seq-len 65 is longer than" in err and "pass --seq-len 64 or less" in err
