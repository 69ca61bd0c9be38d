"""WikiText-2 perplexity with the protocol of the pruning papers (SparseGPT, Wanda).

Protocol: the rows of the `wikitext-2-raw-v1` test split are joined with "\\n\\n" and
tokenized once (with the tokenizer's usual special tokens, e.g. one BOS at the very start
for Llama); the token stream is cut into `len // seq_len` non-overlapping windows of
`seq_len` tokens (the remainder is dropped), optionally only the first `max_windows`.
Every window is a fresh forward pass, so it predicts its last `seq_len - 1` tokens from
the ones before them (its first token is never predicted). Reported NLL is the mean over
those `n_windows * (seq_len - 1)` predicted tokens and ppl = exp(NLL). The papers' code
(`nll = loss * seqlen; ppl = exp(sum(nll) / (nsamples * seqlen))`) gives the same number,
because every window has the same number of predicted tokens.

Local copy of the test split: `<data dir>/wikitext-2-raw/wiki.test.raw`, byte-identical to
the canonical raw file. The Hugging Face `wikitext-2-raw-v1` test split has one row per
line of that file: the row is the line *with* its trailing "\\n", except that blank lines
(only " \\n" in this file) become "" (the original `wikitext.py` loading script does
`yield {"text": row} if row.strip() else {"text": ""}` for each line; the hub's parquet
files were exported from it: 4,358 rows). `wikitext2_test_rows` rebuilds exactly those
rows, so the joined text equals `"\\n\\n".join(load_dataset(...)["test"]["text"])`.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tshrink_harness.data import resolve_data_dir

RAW_TEST_FILE = "wikitext-2-raw/wiki.test.raw"  # relative to the data directory
TOKENS_FILES = {"valid": "wikitext-2-tokens/wiki.valid.tokens",
                "test": "wikitext-2-tokens/wiki.test.tokens"}


@dataclass
class PerplexityResult:
    """Perplexity and everything needed to record how it was measured."""

    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood (nats) per predicted token
    n_tokens: int  # predicted tokens = n_windows * (seq_len - 1)
    seq_len: int  # tokens per window
    stride: int  # start-to-start distance of windows (= seq_len: non-overlapping)
    n_windows: int
    n_text_tokens: int  # tokens in the whole tokenized text (windows may cover fewer)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for result records."""
        return asdict(self)


def hf_rows_from_lines(text: str) -> list[str]:
    """Rows of the Hugging Face wikitext dataset built from a raw file's text: one row per
    line, keeping the line's "\\n", and "" for whitespace-only lines (see module doc)."""
    lines = text.split("\n")
    rows = [line + "\n" for line in lines[:-1]]  # the file ends with "\n"
    if lines[-1]:  # a last line without newline is still a row
        rows.append(lines[-1])
    return [row if row.strip() else "" for row in rows]


def wikitext2_test_rows(data_dir: str | os.PathLike | None = None, *, online: bool = False) -> list[str]:
    """The `wikitext-2-raw-v1` test rows, from the local raw file (default) or, with
    `online=True`, from `datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")`
    (the hub's current name of "wikitext"; needs the hub, so it cannot run offline)."""
    if online:
        from datasets import load_dataset

        return list(load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"])
    path = resolve_data_dir(data_dir, required=True, what="WikiText-2") / RAW_TEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"WikiText-2 raw test file not found at {path}; set TSHRINK_DATA_DIR "
                                "or pass data_dir (or online=True to download it)")
    # read like the HF script (text mode, universal newlines); the file has "\n" ends only
    return hf_rows_from_lines(path.read_text(encoding="utf-8"))


def wikitext2_test_text(data_dir: str | os.PathLike | None = None, *, online: bool = False) -> str:
    """The evaluation text: the test rows joined with "\\n\\n" (as SparseGPT/Wanda do)."""
    return "\n\n".join(wikitext2_test_rows(data_dir, online=online))


def calibration_text(data_dir: str | os.PathLike | None = None, *, split: str = "valid",
                     max_chars: int | None = None) -> str:
    """Calibration text from the word-level WikiText-2 file `wiki.{split}.tokens` (rare
    words appear as `<unk>`), rows rebuilt and joined like the test text, optionally cut to
    the first `max_chars` characters. The valid split keeps calibration disjoint from the
    perplexity test text."""
    if split not in TOKENS_FILES:
        raise ValueError(f"split {split!r} is not available; use one of {sorted(TOKENS_FILES)}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars={max_chars} must be >= 1 (or None for all)")
    path = resolve_data_dir(data_dir, required=True, what="WikiText-2") / TOKENS_FILES[split]
    if not path.exists():
        raise FileNotFoundError(f"WikiText-2 tokens file not found at {path}; set TSHRINK_DATA_DIR "
                                "or pass data_dir")
    text = "\n\n".join(hf_rows_from_lines(path.read_text(encoding="utf-8")))
    return text if max_chars is None else text[:max_chars]


def calibration_windows(tokenizer: Any, text: str, *, n_samples: int = 128, seq_len: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at random offsets of the tokenized `text`
    (SparseGPT/Wanda-style calibration batches), reproducible from `seed`.
    Returns input ids of shape (n_samples, seq_len)."""
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples={n_samples} and seq_len={seq_len} must both be >= 1")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # (n_text_tokens,)
    if ids.numel() < seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def perplexity(model: torch.nn.Module, tokenizer: Any, text: str, *, seq_len: int = 1024,
               max_windows: int | None = None, batch_size: int = 1,
               device: str | torch.device = "cpu") -> PerplexityResult:
    """Perplexity of a causal LM on `text` with non-overlapping windows (see module doc).
    The model must already sit on `device`; it is run in eval mode without a KV cache and
    log-probabilities are taken in float32."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a window predicts seq_len - 1 tokens)")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be >= 1 (or None for all windows)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # (n_text_tokens,)
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)  # (n_windows, seq_len)

    total_nll = 0.0  # float64 accumulator
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for lo in range(0, n_windows, batch_size):
                batch = windows[lo:lo + batch_size].to(device)  # (batch, seq_len)
                logits = model(input_ids=batch, use_cache=False).logits  # (batch, seq_len, vocab)
                logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, seq_len-1, vocab)
                target = batch[:, 1:].unsqueeze(-1)  # (batch, seq_len-1, 1)
                total_nll -= logprobs.gather(-1, target).sum().item()
    finally:
        model.train(was_training)
    n_predicted = n_windows * (seq_len - 1)
    nll = total_nll / n_predicted
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_predicted, seq_len=seq_len,
                            stride=seq_len, n_windows=n_windows, n_text_tokens=ids.numel())


def wikitext2_perplexity(model: torch.nn.Module, tokenizer: Any, *,
                         data_dir: str | os.PathLike | None = None, online: bool = False,
                         seq_len: int = 1024, max_windows: int | None = None, batch_size: int = 1,
                         device: str | torch.device = "cpu") -> PerplexityResult:
    """WikiText-2 (raw) test perplexity with the SparseGPT/Wanda protocol."""
    text = wikitext2_test_text(data_dir, online=online)
    return perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=max_windows,
                      batch_size=batch_size, device=device)
