"""Sequence-to-sequence translation scored with corpus BLEU (sacrebleu).

For encoder-decoder models such as Marian (``Helsinki-NLP/opus-mt-en-de``): translate the
source sentences with ``model.generate`` (greedy or beam search), decode without special
tokens and score the hypotheses against one reference per sentence with
sacrebleu's corpus BLEU (``sacrebleu.corpus_bleu`` defaults: 13a tokenisation, exponential smoothing, mixed
case), the WMT convention. The poster's experiment, given a WMT model and data::

    from transformers import MarianMTModel, MarianTokenizer
    from tshrink_harness.tasks.translation import evaluate_bleu, read_parallel
    pairs = read_parallel("newstest2014-deen-src.en.txt", "newstest2014-deen-ref.de.txt")
    tok = MarianTokenizer.from_pretrained("opus-mt-en-de")         # a local directory
    model = MarianMTModel.from_pretrained("opus-mt-en-de").eval()
    print(evaluate_bleu(model, tok, pairs, batch_size=32, max_new_tokens=256, num_beams=4))

then quantize (``tshrink.pipeline.prune(model, "kmeans", options={"quant_scope": "attention"})``)
and evaluate again. Parallel data: two files with one sentence per line (aligned by line),
or WMT ``.sgm`` files, whose ``<seg>`` contents are read the way sacrebleu reads them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

_SEG = re.compile(r"<seg[^>]*>(.*)</seg>")


def read_lines(path: str | os.PathLike) -> list[str]:
    """Sentences of a text file (one per line, trailing whitespace stripped) or of a WMT
    ``.sgm`` file (the text of every ``<seg ...>...</seg>`` line, in file order)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".sgm":
        return [m.group(1).strip() for m in map(_SEG.search, text.splitlines()) if m]
    return [line.rstrip() for line in text.split("\n")[:-1 if text.endswith("\n") else None]]


def read_parallel(src: str | os.PathLike, ref: str | os.PathLike, *, limit: int | None = None) -> list[tuple[str, str]]:
    """``(source, reference)`` pairs from two aligned files (see :func:`read_lines`), the
    first ``limit`` only if given."""
    sources, refs = read_lines(src), read_lines(ref)
    if len(sources) != len(refs):
        raise ValueError(f"{src} has {len(sources)} sentences but {ref} has {len(refs)}; the files must be aligned")
    if not sources:
        raise ValueError(f"{src} holds no sentences")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for all)")
    return list(zip(sources, refs))[:limit]


@torch.no_grad()
def translate(model: torch.nn.Module, tokenizer: Any, sources: Sequence[str], *, batch_size: int = 16,
              max_new_tokens: int = 256, num_beams: int = 4, device: str | torch.device = "cpu",
              max_source_length: int = 512) -> list[str]:
    """Hypotheses for ``sources`` in their order. Sentences are batched by length (less
    padding); the model must already sit on ``device``."""
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"batch_size={batch_size}, max_new_tokens={max_new_tokens} and num_beams={num_beams} "
                         "must all be >= 1")
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            enc = tokenizer([sources[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_source_length)
            gen = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
            for i, text in zip(idx, tokenizer.batch_decode(gen, skip_special_tokens=True)):
                out[i] = text.strip()
    finally:
        model.train(was_training)
    return out


def evaluate_bleu(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                  max_new_tokens: int = 256, num_beams: int = 4, device: str | torch.device = "cpu",
                  return_hypotheses: bool = False) -> dict[str, Any]:
    """Corpus BLEU of ``model`` on ``(source, reference)`` pairs.

    Returns ``{"bleu": score in [0, 100], "n": sentences, "signature": sacrebleu's
    signature, "num_beams", "max_new_tokens"}`` plus ``"hypotheses"`` when asked.
    """
    import sacrebleu

    if not pairs:
        raise ValueError("no sentence pairs to evaluate")
    sources = [s for s, _ in pairs]
    refs = [r for _, r in pairs]
    hyps = translate(model, tokenizer, sources, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     num_beams=num_beams, device=device)
    metric = sacrebleu.BLEU()  # the defaults of sacrebleu.corpus_bleu
    score = metric.corpus_score(hyps, [refs])
    out = {"bleu": float(score.score), "n": len(pairs), "signature": str(metric.get_signature()),
           "num_beams": num_beams, "max_new_tokens": max_new_tokens}
    if return_hypotheses:
        out["hypotheses"] = hyps
    return out


def translation_batches(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_length: int = 128,
                        batch_size: int = 16, source: str = "parallel text") -> Any:
    """Labelled seq2seq calibration batches (``input_ids``, ``attention_mask``, ``labels``
    with -100 on padding), e.g. for a recovery training after quantizing a translation model."""
    from tshrink.calibration import CalibrationData

    if not pairs:
        raise ValueError("no sentence pairs to build calibration batches from")
    batches = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        enc = tokenizer([s for s, _ in chunk], text_target=[r for _, r in chunk], return_tensors="pt",
                        padding=True, truncation=True, max_length=max_length)
        labels = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return CalibrationData(batches, source=source, meta={"kind": "seq2seq"})
