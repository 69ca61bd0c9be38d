"""Decoder tasks (perplexity, lm-eval) and the encoder embedding-agreement default.

Perplexity everywhere follows :func:`tshrink_harness.tasks.wikitext.perplexity`:
non-overlapping windows of ``seq_len`` tokens (stride = seq_len), each predicting its last
``seq_len - 1`` tokens; ppl = exp(mean NLL). Calibration for decoders is next-token
language modelling (``labels`` = the input ids), so label-needing methods work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import EvalResult, Task, data_hash, register, register_prefix


def _lm_calibration(tokenizer: Any, ids: Any, *, source: str, batch_size: int) -> Any:
    """CalibrationData from windows of token ids (n, seq_len), next-token labels."""
    import torch

    from tshrink.calibration import CalibrationData

    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()}
               for w in ids.split(batch_size)]
    return CalibrationData(batches, source=source, meta={"kind": "lm", "windows": int(ids.shape[0])})


def _perplexity(model: Any, tokenizer: Any, text: str, *, split: str, device: str, limit: int | None,
                seq_len: int, batch_size: int) -> EvalResult:
    from .wikitext import perplexity

    res = perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=limit, batch_size=batch_size,
                     device=device)
    full = res.n_windows == res.n_text_tokens // seq_len
    info = {"split": split, "seq_len": res.seq_len, "stride": res.stride, "windows": res.n_windows,
            "predicted_tokens": res.n_tokens, "text_tokens": res.n_text_tokens, "whole_split": full,
            "protocol": "non-overlapping windows, each predicts its last seq_len-1 tokens; ppl = exp(mean NLL)"}
    return EvalResult({"perplexity": res.ppl, "nll": res.nll}, info)


@dataclass
class PyDocsTask(Task):
    """Perplexity on the held-out fifth of the Python documentation shipped with CPython."""

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        from tshrink.textdata import builtin_text

        self._calib, self._eval = builtin_text("calibration"), builtin_text("evaluation")
        self.info = {"task": self.name, "split": "python-docs:evaluation", "calibration": "python-docs:calibration",
                     "data_hash": data_hash([self._calib, self._eval])}

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        from tshrink.calibration import lm_batches_from_text

        return lm_batches_from_text(tokenizer, self._calib, seq_len=seq_len, n_sequences=samples,
                                    batch_size=batch_size, source="python-docs:calibration")

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        return _perplexity(model, tokenizer, self._eval, split="python-docs:evaluation", device=device,
                           limit=limit, seq_len=seq_len, batch_size=batch_size)


@dataclass
class WikiText2Task(Task):
    """WikiText-2 raw test perplexity (SparseGPT/Wanda protocol); calibration on random
    windows of the word-level validation file (disjoint from the test text)."""

    FILES = {"evaluation": ["wikitext-2-raw/wiki.test.raw"], "calibration": ["wikitext-2-tokens/wiki.valid.tokens"]}

    @classmethod
    def present(cls, data_dir: Path) -> bool:
        return all((data_dir / f[0]).is_file() for f in cls.FILES.values())

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        from . import wikitext

        if data_dir is None:
            try:
                self._eval = wikitext.wikitext2_test_text(online=True)
                self._calib = _hub_wikitext_valid() if need_train else ""
            except Exception as err:  # noqa: BLE001 - offline: say what to do instead
                raise FileNotFoundError(
                    f"task {self.name!r}: no data directory (--data-dir / $TSHRINK_DATA_DIR) and the Hugging Face "
                    f"hub failed ({type(err).__name__}: {str(err)[:200]}). Expected layout: {self.data_layout}") from None
            files = {"evaluation": "hub:Salesforce/wikitext/wikitext-2-raw-v1/test",
                     "calibration": "hub:Salesforce/wikitext/wikitext-2-raw-v1/validation"}
        else:
            from ..data import require_files

            found = require_files(data_dir, self.FILES, what=f"task {self.name!r}", layout=self.data_layout)
            self._eval = wikitext.wikitext2_test_text(data_dir)
            self._calib = wikitext.calibration_text(data_dir) if need_train else ""
            files = {role: str(path.relative_to(data_dir)) for role, path in found.items()}
        self.info = {"task": self.name, "split": "wikitext-2-raw-v1:test", "files": files,
                     "data_hash": data_hash([self._eval, self._calib])}

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        from .wikitext import calibration_windows

        ids = calibration_windows(tokenizer, self._calib, n_samples=samples, seq_len=seq_len, seed=seed)
        return _lm_calibration(tokenizer, ids, source="wikitext-2:valid (random windows)", batch_size=batch_size)

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        return _perplexity(model, tokenizer, self._eval, split="wikitext-2-raw-v1:test", device=device,
                           limit=limit, seq_len=seq_len, batch_size=batch_size)


def _hub_wikitext_valid() -> str:
    from datasets import load_dataset

    return "\n\n".join(load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="validation")["text"])


@dataclass
class LmEvalTask(Task):
    """One lm-evaluation-harness task on the in-memory model; calibration on Python docs."""

    include: str | None = None

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        from lm_eval.tasks import TaskManager

        from tshrink.textdata import builtin_text

        import difflib

        lm_name = self.name.split(":", 1)[1]
        manager = TaskManager(include_path=[self.include] if self.include else None,
                              include_defaults=self.include is None)
        close = difflib.get_close_matches(lm_name, manager.all_tasks, n=3)
        if lm_name not in manager.all_tasks and self.include is not None and not close:
            # not a (misspelt) local task: maybe a built-in one (indexing those takes ~20 s)
            manager = TaskManager(include_path=[self.include], include_defaults=True)
            close = difflib.get_close_matches(lm_name, manager.all_tasks, n=3)
        if lm_name not in manager.all_tasks:
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown lm-eval task {lm_name!r}.{hint} ({len(manager.all_tasks)} tasks known"
                             + (f", including those in {self.include}" if self.include else "")
                             + "; local task YAMLs go in --lmeval-include DIR)")
        self._calib = builtin_text("calibration")
        configs = sorted(Path(self.include).rglob("*")) if self.include else []
        self.info = {"task": self.name, "split": f"lm-eval:{lm_name}", "include": self.include,
                     "data_hash": data_hash([[str(p.relative_to(self.include)), p.read_bytes().hex()]
                                             for p in configs if p.is_file()] or lm_name)}

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        from tshrink.calibration import lm_batches_from_text

        return lm_batches_from_text(tokenizer, self._calib, seq_len=seq_len, n_sequences=samples,
                                    batch_size=batch_size, source="python-docs:calibration")

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        from .lmeval import run_lm_eval

        lm_name = self.name.split(":", 1)[1]
        res = run_lm_eval(model, tokenizer, [lm_name], include_path=self.include, limit=limit,
                          batch_size=batch_size, device=device)
        metrics = {k: v for k, v in res.metrics.get(lm_name, {}).items() if "stderr" not in k}
        main = next((k for k in ("acc_norm,none", "acc,none", "exact_match,none", "f1,none") if k in metrics),
                    sorted(metrics)[0] if metrics else self.main_metric)
        return EvalResult(metrics, {"split": f"lm-eval:{lm_name}", "documents": res.n_samples.get(lm_name),
                                    "limit": limit, "main_metric": main})


def _lmeval_factory(name: str, *, lmeval_include: str | None = None, **others: Any) -> Task:
    for key, value in others.items():
        if value is not None:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to task 'lmeval:{name}'")
    if lmeval_include is not None and not os.path.isdir(lmeval_include):
        raise FileNotFoundError(f"--lmeval-include {lmeval_include!r} is not a directory")
    return LmEvalTask(f"lmeval:{name}", "lmeval", "causal", "causal-lm", ("acc,none",), "acc,none",
                      description="EleutherAI lm-evaluation-harness task", seq_len=256, calib_samples=32,
                      labelled_calibration=True, include=lmeval_include,
                      data_layout="lm-eval task YAMLs (built-in ones read the hub; local ones via --lmeval-include)")


@dataclass
class EmbeddingTask(Task):
    """Cosine agreement of mean-pooled last hidden states with the dense model's, on Python
    documentation paragraphs (no task head needed; 1.0 = unchanged)."""

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        from tshrink.textdata import builtin_sentences

        self._calib, self._eval = builtin_sentences("calibration"), builtin_sentences("evaluation")
        self._reference: list[Any] | None = None
        self.info = {"task": self.name, "split": "python-docs:evaluation", "calibration": "python-docs:calibration",
                     "data_hash": data_hash([self._calib, self._eval])}

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        from tshrink.calibration import batches_from_texts

        return batches_from_texts(tokenizer, self._calib[:samples], seq_len=seq_len, batch_size=batch_size,
                                  source="python-docs:calibration")

    def _pooled(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                batch_size: int) -> list[Any]:
        import torch

        from tshrink.calibration import batches_from_texts

        data = batches_from_texts(tokenizer, self._eval[:limit], seq_len=seq_len, batch_size=batch_size,
                                  source="python-docs:evaluation")
        out = []
        with torch.no_grad():
            for b in data.batches:
                mask = b["attention_mask"].to(device)  # (batch, seq)
                backbone = getattr(model, "base_model", model)  # a classifier's head is kept, not evaluated
                h = backbone(**{k: v.to(device) for k, v in b.items()})[0]  # (batch, seq, hidden)
                out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return out

    def on_dense(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> None:
        self._reference = self._pooled(model, tokenizer, device=device, limit=limit, seq_len=seq_len,
                                       batch_size=batch_size)

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        import torch

        if self._reference is None:
            raise RuntimeError("EmbeddingTask.evaluate before on_dense: no reference embeddings")
        pooled = self._pooled(model, tokenizer, device=device, limit=limit, seq_len=seq_len, batch_size=batch_size)
        cos = torch.cat([torch.nn.functional.cosine_similarity(a, r, dim=-1) for a, r in zip(pooled, self._reference)])
        return EvalResult({"embedding_cosine": cos.mean().item()},
                          {"split": "python-docs:evaluation", "examples": int(cos.numel()), "seq_len": seq_len})


register(PyDocsTask("pydocs", "perplexity", "causal", "causal-lm", ("perplexity", "nll"), "perplexity",
                    higher_is_better=False, description="perplexity on held-out Python documentation (offline)",
                    seq_len=256, calib_samples=32, eval_samples=16, labelled_calibration=True))
register(WikiText2Task("wikitext2", "perplexity", "causal", "causal-lm", ("perplexity", "nll"), "perplexity",
                       higher_is_better=False, description="WikiText-2 raw test perplexity (SparseGPT/Wanda protocol)",
                       seq_len=1024, calib_samples=32, labelled_calibration=True, aliases=("wikitext", "wikitext-2"),
                       data_layout="<data>/wikitext-2-raw/wiki.test.raw + <data>/wikitext-2-tokens/wiki.valid.tokens"))
register(EmbeddingTask("pydocs-embedding", "embedding", "encoder", "base", ("embedding_cosine",), "embedding_cosine",
                       description="agreement of mean-pooled embeddings with the dense model (offline, no head)",
                       seq_len=128, calib_samples=256, eval_samples=256))
register_prefix("lmeval", _lmeval_factory)
