"""Sequence-to-sequence translation scored with corpus BLEU (sacrebleu), and the
``translation`` harness task.

For encoder-decoder models such as Marian (``Helsinki-NLP/opus-mt-en-de``): translate the
source sentences with ``model.generate`` (greedy or beam search), decode without special
tokens and score the hypotheses against one reference per sentence with
sacrebleu's corpus BLEU (``sacrebleu.corpus_bleu`` defaults: 13a tokenisation, exponential smoothing, mixed
case), the WMT convention. The poster's experiment (k-means and binarization of a WMT
En-De Transformer), given a local Marian model directory and parallel text laid out as
:data:`LAYOUT` says::

    harness compare --model /path/opus-mt-en-de --task translation --data-dir DIR \
        --methods kmeans,binarize,bs-flex --opt quant_scope=attention --flops 1 [--num-beams 4]

gives BLEU per method next to size on disk and bits per weight, with the dense model as a
row (``--eval-samples N`` evaluates the first N held-out sentences only). The library
functions work without the harness::

    from transformers import MarianMTModel, MarianTokenizer
    from tshrink_harness.tasks.translation import evaluate_bleu, read_parallel
    pairs = read_parallel("newstest2014-deen-src.en.txt", "newstest2014-deen-ref.de.txt")
    tok = MarianTokenizer.from_pretrained("opus-mt-en-de")         # a local directory
    model = MarianMTModel.from_pretrained("opus-mt-en-de").eval()
    print(evaluate_bleu(model, tok, pairs, batch_size=32, max_new_tokens=256, num_beams=4))

then quantize (``tshrink.pipeline.prune(model, "kmeans", options={"quant_scope": "attention"})``)
and evaluate again. Parallel data: two files with one sentence per line (aligned by line),
or WMT ``.sgm`` files, whose ``<seg>`` contents are read the way sacrebleu reads them.
torch and sacrebleu are imported inside the functions (``harness tasks`` stays instant).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .registry import EvalResult, Task, data_hash, register

if TYPE_CHECKING:
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


def translate(model: torch.nn.Module, tokenizer: Any, sources: Sequence[str], *, batch_size: int = 16,
              max_new_tokens: int = 256, num_beams: int = 4, device: str | torch.device = "cpu",
              max_source_length: int = 512) -> list[str]:
    """Hypotheses for ``sources`` in their order. Sentences are batched by length (less
    padding; each batch is ``input_ids`` (batch, <= max_source_length)); the model must
    already sit on ``device``."""
    import torch

    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"batch_size={batch_size}, max_new_tokens={max_new_tokens} and num_beams={num_beams} "
                         "must all be >= 1")
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for lo in range(0, len(order), batch_size):
                idx = order[lo:lo + batch_size]
                enc = tokenizer([sources[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                max_length=max_source_length)
                gen = model.generate(input_ids=enc["input_ids"].to(device),
                                     attention_mask=enc["attention_mask"].to(device),
                                     max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
                for i, text in zip(idx, tokenizer.batch_decode(gen, skip_special_tokens=True)):
                    out[i] = text.strip()
    finally:
        model.train(was_training)
    return out


def evaluate_bleu(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                  max_new_tokens: int = 256, num_beams: int = 4, device: str | torch.device = "cpu",
                  return_hypotheses: bool = False, max_source_length: int = 512) -> dict[str, Any]:
    """Corpus BLEU of ``model`` on ``(source, reference)`` pairs.

    Returns ``{"bleu": score in [0, 100], "n": sentences, "signature": sacrebleu's
    signature, "num_beams", "max_new_tokens"}`` plus ``"hypotheses"`` when asked. Sources
    longer than ``max_source_length`` tokens are truncated.
    """
    import sacrebleu

    if not pairs:
        raise ValueError("no sentence pairs to evaluate")
    sources = [s for s, _ in pairs]
    refs = [r for _, r in pairs]
    hyps = translate(model, tokenizer, sources, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     num_beams=num_beams, device=device, max_source_length=max_source_length)
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


# -- the harness task -------------------------------------------------------------------------

FILES = {"source": ["translation/source.txt", "translation/source.sgm"],
         "reference": ["translation/reference.txt", "translation/reference.sgm"]}
TRAIN_FILES = {"train source": ["translation/train.source.txt", "translation/train.source.sgm"],
               "train reference": ["translation/train.reference.txt", "translation/train.reference.sgm"]}
LAYOUT = ("<data>/translation/source.txt + reference.txt (aligned, one sentence per line) or source.sgm + "
          "reference.sgm (WMT SGML, one <seg> per sentence); optionally train.source.txt + train.reference.txt "
          "(or .sgm) beside them for calibration. Without a train pair the first half of the lines (floor(n/2)) "
          "calibrates and the rest is evaluated; with one, every line is evaluated")


@dataclass
class TranslationTask(Task):
    """Corpus BLEU of an encoder-decoder (``AutoModelForSeq2SeqLM``) on local parallel text.

    Split: with ``translation/train.*`` files they calibrate and every line of
    ``source``/``reference`` is evaluated; without them lines ``1..n//2`` calibrate and
    lines ``n//2+1..n`` are evaluated (``--eval-samples N``: the first N of those). The
    split name (``translation:eval (lines A-B)``) travels with every number. Calibration
    batches are teacher-forced pairs (``labels`` = target ids, -100 on padding), so
    methods with a recovery training (bs-flex) minimise the translation loss.
    Decoding: greedy by default (``num_beams=1``), at most ``max_new_tokens`` new tokens
    (capped at the model's ``max_position_embeddings - 1``); sources truncated at seq_len.
    """

    num_beams: int = 1
    max_new_tokens: int = 256

    def configure(self, *, num_beams: int | None = None, max_new_tokens: int | None = None, **others: Any) -> None:
        super().configure(**others)
        for flag, value in (("--num-beams", num_beams), ("--max-new-tokens", max_new_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
        self.num_beams = self.num_beams if num_beams is None else num_beams
        self.max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens

    def check_model(self, config: Any, spec: str) -> None:
        """ValueError unless ``config`` is an encoder-decoder with a seq2seq LM head in transformers."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

        from .registry import config_kind

        super().check_model(config, spec)  # a known other kind (encoder, decoder): names the tasks for it
        model_type = getattr(config, "model_type", None)
        if config_kind(config) != "seq2seq":
            raise ValueError(f"task {self.name!r} (translation) needs an encoder-decoder (seq2seq) model such as "
                             f"Marian (opus-mt-*); model {spec!r} ({model_type}) is not one "
                             f"(its config has no is_encoder_decoder=True)")
        if model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"task {self.name!r} needs a model AutoModelForSeq2SeqLM can load (a generation head); "
                             f"transformers has none for model type {model_type!r} of {spec!r}")

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        """Read both files (and the train pair if present), fix the split, fill ``info``.
        The split does not depend on ``need_train``: every method is scored on the same lines."""
        from ..data import ENV, require_files

        what = f"task {self.name!r}"
        if data_dir is None:
            raise FileNotFoundError(f"{what} needs local parallel text: pass --data-dir DIR or set {ENV}=DIR. "
                                    f"Expected layout: {self.data_layout}")
        found = require_files(data_dir, FILES, what=what, layout=self.data_layout)
        pairs = read_parallel(found["source"], found["reference"])
        present = {role: [data_dir / rel for rel in rels if (data_dir / rel).is_file()] for role, rels in TRAIN_FILES.items()}
        if any(present.values()):
            train = require_files(data_dir, TRAIN_FILES, what=f"{what} (train pair)", layout=self.data_layout)
            self._calib = read_parallel(train["train source"], train["train reference"])
            self._eval, self._first = pairs, 1
            calib_desc = (f"translation:train ({train['train source'].name} + {train['train reference'].name}, "
                          f"lines 1-{len(self._calib)})")
            found.update(train)
        else:
            if len(pairs) < 2:
                raise ValueError(f"{what}: {found['source']} holds {len(pairs)} sentence; without a train pair "
                                 f"({', '.join(r[0] for r in TRAIN_FILES.values())}) the lines are halved into "
                                 f"calibration and evaluation, which needs at least 2")
            cut = len(pairs) // 2
            self._calib, self._eval, self._first = pairs[:cut], pairs[cut:], cut + 1
            calib_desc = f"translation:calibration (lines 1-{cut})"
        split = f"translation:eval (lines {self._first}-{self._first + len(self._eval) - 1})"
        decoding = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        self.info = {"task": self.name, "split": split, "calibration": calib_desc,
                     "files": {role: str(path.relative_to(data_dir)) for role, path in found.items()},
                     "eval_sentences": len(self._eval), "calibration_sentences": len(self._calib),
                     "decoding": decoding,
                     # the decoding settings change every BLEU: part of the hash, so records never mix them
                     "data_hash": data_hash([split, self._eval, self._calib, decoding])}

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        """``samples`` random calibration pairs (seeded) as labelled batches: ``input_ids``,
        ``attention_mask`` (batch, <= seq_len) and ``labels`` (batch, <= seq_len)."""
        if not self._calib:
            raise ValueError(f"task {self.name!r}: no calibration sentence pairs were read")
        chosen = (list(self._calib) if samples >= len(self._calib)
                  else random.Random(seed).sample(self._calib, samples))
        return translation_batches(tokenizer, chosen, max_length=seq_len, batch_size=batch_size,
                                   source=f"{self.info['calibration']} (random {len(chosen)}, seed {seed})")

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        pairs = self._eval[:limit]
        max_pos = getattr(model.config, "max_position_embeddings", None)
        new = min(self.max_new_tokens, max_pos - 1) if max_pos else self.max_new_tokens
        out = evaluate_bleu(model, tokenizer, pairs, batch_size=batch_size, max_new_tokens=new,
                            num_beams=self.num_beams, device=device, max_source_length=seq_len)
        return EvalResult({"bleu": out["bleu"]}, {
            "split": self.info["split"], "sentences": out["n"],
            "lines": f"{self._first}-{self._first + out['n'] - 1}",
            "decoding": "greedy" if self.num_beams == 1 else f"beam search, {self.num_beams} beams",
            "num_beams": self.num_beams, "max_new_tokens": new, "max_source_length": seq_len,
            "metric": f"sacrebleu corpus BLEU ({out['signature']})"})


register(TranslationTask("translation", "translation", "seq2seq", "seq2seq-lm", ("bleu",), "bleu",
                         description="corpus BLEU (sacrebleu) of an encoder-decoder on local parallel text (WMT style)",
                         seq_len=256, calib_samples=64, labelled_calibration=True, data_layout=LAYOUT,
                         aliases=("wmt", "bleu", "mt")))
