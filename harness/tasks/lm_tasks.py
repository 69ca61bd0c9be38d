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


PROTOCOLS = {
    "standard": "SparseGPT / Wanda / SliceGPT: the whole test split joined with '\\n\\n', tokenized once, "
                "non-overlapping windows of seq_len (2048 unless --seq-len), mean NLL over all windows' predicted "
                "tokens; ppl = exp(mean NLL)",
    "quick": "quick variant: the same windows, but short (256 tokens) and only the first 16 (not comparable "
             "with published numbers)",
    "pydocs": "non-overlapping windows, each predicts its last seq_len-1 tokens; ppl = exp(mean NLL)",
}


def _perplexity(model: Any, tokenizer: Any, text: str, *, split: str, device: str, limit: int | None,
                seq_len: int, batch_size: int, protocol: str = "pydocs") -> EvalResult:
    from .wikitext import perplexity

    res = perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=limit, batch_size=batch_size,
                     device=device)
    full = res.n_windows == res.n_text_tokens // seq_len
    info = {"split": split, "seq_len": res.seq_len, "stride": res.stride, "windows": res.n_windows,
            "predicted_tokens": res.n_tokens, "text_tokens": res.n_text_tokens, "whole_split": full,
            "protocol": protocol, "protocol_description": PROTOCOLS[protocol],
            "kv_cache_bytes_per_token": _kv_bytes_per_token(model)}
    if protocol == "standard" and not full:
        info["deviation"] = f"only the first {res.n_windows} of {res.n_text_tokens // seq_len} windows (--eval-samples)"
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
                           limit=limit, seq_len=seq_len, batch_size=batch_size, protocol="pydocs")


@dataclass
class WikiText2Task(Task):
    """WikiText-2 raw test perplexity; calibration on random windows of the word-level
    validation file (disjoint from the test text). ``protocol``: "standard" (the papers':
    2048-token windows over the whole test split) or "quick" (16 windows of 256 tokens)."""

    protocol: str = "standard"

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
                           limit=limit, seq_len=seq_len, batch_size=batch_size, protocol=self.protocol)


def _hub_wikitext_valid() -> str:
    from datasets import load_dataset

    return "\n\n".join(load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="validation")["text"])


def _kv_bytes_per_token(model: Any) -> int | None:
    """Bytes the KV cache holds per token: keys and values of every kept KV head of every
    layer, in the model's dtype (None without an architecture adapter)."""
    from tshrink.arch.families import get_adapter

    try:
        adapter = get_adapter(model)
    except ValueError:
        return None
    total = 0
    for layer in range(adapter.num_layers):
        k = adapter.attn(layer).k
        if k is not None:
            total += 2 * k.out_features * k.weight.element_size()  # keys + values
    return total


def _calibration_source(data_dir: Path | None, need_train: bool) -> tuple[str, str]:
    """(name, text) of decoder calibration text: the word-level WikiText-2 validation file when the
    data directory holds it (disjoint from every evaluation set), else held-out Python docs."""
    from tshrink.textdata import builtin_text

    from . import wikitext

    if not need_train:
        return "-", ""
    if data_dir is not None and (data_dir / wikitext.TOKENS_FILES["valid"]).is_file():
        return "wikitext-2:valid (random windows)", wikitext.calibration_text(data_dir)
    return "python-docs:calibration", builtin_text("calibration")


@dataclass
class LmEvalTask(Task):
    """lm-evaluation-harness tasks (one or a suite) on the in-memory model.

    lm-eval's own task definitions are used; with a data directory their dataset is the local
    copy ``<data>/lm-eval/<task>/<split>.jsonl`` (see :mod:`.lmeval`), without one lm-eval reads
    the hub. Tasks in ``include`` (a folder of YAMLs) are used as written. Metrics are named
    ``<task>/<metric>`` (``piqa/acc``, ``piqa/acc_norm``, ``lambada_openai/perplexity``); the
    suite's main metric ``mean_acc`` averages, over the tasks, acc_norm where a task defines it
    and acc otherwise (the convention of the SliceGPT code; see README)."""

    include: str | None = None
    lm_tasks: tuple[str, ...] = ()
    num_fewshot: int | None = 0

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        from . import lmeval

        manager = lmeval.task_manager(self.include)
        local_names = set()
        if self.include:
            from lm_eval.tasks import TaskManager

            local_names = set(TaskManager(include_path=[self.include], include_defaults=False).all_tasks)
        self._specs: list[Any] = []  # per task: a name (hub or --lmeval-include) or a redirected config
        files, hashes = {}, []
        for name in self.lm_tasks:
            if name not in manager.all_tasks:
                raise ValueError(lmeval.unknown_task_message(name, manager, include=self.include))
            if name in local_names or data_dir is None:
                self._specs.append(name)
                files[name] = f"lm-eval task {name!r}" + (f" from {self.include}" if name in local_names else " (hub)")
                hashes.append(name)
                continue
            cfg = lmeval.task_config(manager, name)
            file = lmeval.local_file(data_dir, cfg)
            if not file.is_file():
                raise FileNotFoundError(
                    f"task {self.name!r}: lm-eval task {name!r} evaluates the {lmeval.eval_split(cfg)!r} split of "
                    f"{cfg.get('dataset_path')}{'/' + cfg['dataset_name'] if cfg.get('dataset_name') else ''}; "
                    f"expected its local copy (JSON lines, the hub dataset's schema) at {file}. Put it there, "
                    f"or run online without a data directory (unset TSHRINK_DATA_DIR) to read the hub")
            self._specs.append(lmeval.local_task_config(cfg, file.resolve()))
            files[name] = str(file.relative_to(data_dir))
            hashes.append([name, _file_hash(file)])
        self._sizes = self._count_docs(manager)
        self._calib_source, self._calib = _calibration_source(data_dir, need_train)
        configs = sorted(Path(self.include).rglob("*")) if self.include else []
        hashes += [[str(p.relative_to(self.include)), _file_hash(p)] for p in configs if p.is_file()]
        self._warned = False
        self.info = {"task": self.name, "split": "lm-eval:" + ",".join(self.lm_tasks), "lm_eval_tasks": list(self.lm_tasks),
                     "files": files, "documents_available": self._sizes, "include": self.include,
                     "calibration": self._calib_source, "data_hash": data_hash(hashes)}

    def _count_docs(self, manager: Any) -> dict[str, int | None]:
        """Evaluation documents per task. Every task is built now (local copies read, hub data
        downloaded and cached), so a missing or broken dataset fails before any model is loaded."""
        from lm_eval.tasks import get_task_dict

        from . import lmeval

        out: dict[str, int | None] = {}
        for name, spec in zip(self.lm_tasks, self._specs):
            try:
                built = get_task_dict([spec], manager)
            except Exception as err:  # noqa: BLE001 - hub offline, bad local file: say what to do
                if isinstance(spec, dict):
                    raise ValueError(f"task {self.name!r}: lm-eval cannot read the local copy of {name!r} "
                                     f"({type(err).__name__}: {str(err)[:200]})") from None
                where = "" if self.include and name not in manager.all_tasks else (
                    f"; offline, put its evaluation split at <data dir>/{lmeval.LOCAL_DIR}/{name}/"
                    f"{lmeval.eval_split(lmeval.task_config(manager, name))}.jsonl and pass --data-dir")
                raise FileNotFoundError(f"task {self.name!r}: lm-eval could not load {name!r} "
                                        f"({type(err).__name__}: {str(err)[:200]}){where}") from None
            for task in built.values():
                out[name] = len(list(task.eval_docs))
        return {n: out.get(n) for n in self.lm_tasks}

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        from tshrink.calibration import lm_batches_from_text

        if self._calib_source.startswith("wikitext"):
            from .wikitext import calibration_windows

            ids = calibration_windows(tokenizer, self._calib, n_samples=samples, seq_len=seq_len, seed=seed)
            return _lm_calibration(tokenizer, ids, source=self._calib_source, batch_size=batch_size)
        return lm_batches_from_text(tokenizer, self._calib, seq_len=seq_len, n_sequences=samples,
                                    batch_size=batch_size, source=self._calib_source)

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        import sys

        from .lmeval import COLUMNS, run_lm_eval

        capped = {n: size for n, size in self._sizes.items() if limit is not None and size is not None and limit > size}
        if capped and not self._warned:
            print(f"note: --eval-samples {limit} is more than " + ", ".join(f"{n}'s {k} documents" for n, k in capped.items())
                  + "; those tasks use all their documents", file=sys.stderr)
            self._warned = True
        res = run_lm_eval(model, tokenizer, self._specs, include_path=self.include, limit=limit,
                          batch_size=batch_size, device=device, num_fewshot=self.num_fewshot)
        metrics: dict[str, float] = {}
        columns, headline = [], []
        for name in self.lm_tasks:
            values = {k.split(",")[0]: v for k, v in res.metrics.get(name, {}).items() if "stderr" not in k}
            metrics.update({f"{name}/{k}": v for k, v in values.items()})
            pick = "acc_norm" if "acc_norm" in values else "acc" if "acc" in values else None
            if pick is not None:
                headline.append(values[pick])
                columns.append({"column": COLUMNS.get(name, name), "metric": f"{name}/{pick}"})
            if "perplexity" in values:
                columns.append({"column": f"{COLUMNS.get(name, name)} ppl", "metric": f"{name}/perplexity"})
        if headline:
            metrics["mean_acc"] = sum(headline) / len(headline)
        documents = {n: res.n_samples.get(n) for n in self.lm_tasks}
        return EvalResult(metrics, {
            "split": self.info["split"], "documents": documents, "documents_available": self._sizes,
            "limit": limit, "capped": sorted(capped), "whole_split": all(
                documents[n] is not None and documents[n] == self._sizes.get(n) for n in self.lm_tasks),
            "num_fewshot": self.num_fewshot, "columns": columns, "main_metric": "mean_acc" if headline else
            (sorted(metrics)[0] if metrics else self.main_metric),
            "mean_of": [c["metric"] for c in columns if not c["metric"].endswith("/perplexity")],
            "kv_cache_bytes_per_token": _kv_bytes_per_token(model),
            "protocol": "lm-eval's own task definitions (prompts, choices, metrics), zero-shot, "
                        "log-likelihood of each choice; data: " + ", ".join(f"{k}={v}" for k, v in self.info["files"].items())})


def _file_hash(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _lmeval_factory(name: str, *, lmeval_include: str | None = None, **others: Any) -> Task:
    for key, value in others.items():
        if value is not None:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to task 'lmeval:{name}'")
    if lmeval_include is not None and not os.path.isdir(lmeval_include):
        raise FileNotFoundError(f"--lmeval-include {lmeval_include!r} is not a directory")
    names = tuple(dict.fromkeys(n.strip() for n in name.split(",") if n.strip()))
    if not names:
        raise ValueError(f"task 'lmeval:{name}' names no lm-eval task; e.g. lmeval:piqa,arc_easy")
    return LmEvalTask(f"lmeval:{','.join(names)}", "lmeval", "causal", "causal-lm", ("mean_acc",), "mean_acc",
                      description="EleutherAI lm-evaluation-harness task(s)", seq_len=256, calib_samples=32,
                      labelled_calibration=True, include=lmeval_include, lm_tasks=names, num_fewshot=None,
                      data_layout="lm-eval's task definitions; data: <data>/lm-eval/<task>/<split>.jsonl, else the hub")


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
_WIKI_LAYOUT = "<data>/wikitext-2-raw/wiki.test.raw + <data>/wikitext-2-tokens/wiki.valid.tokens"
register(WikiText2Task("wikitext2", "perplexity", "causal", "causal-lm", ("perplexity", "nll"), "perplexity",
                       higher_is_better=False, description="WikiText-2 raw test perplexity, standard protocol "
                       "(SparseGPT/Wanda/SliceGPT: whole test split, 2048-token windows)",
                       seq_len=2048, calib_samples=32, labelled_calibration=True, aliases=("wikitext", "wikitext-2"),
                       data_layout=_WIKI_LAYOUT, protocol="standard"))
register(WikiText2Task("wikitext2-quick", "perplexity", "causal", "causal-lm", ("perplexity", "nll"), "perplexity",
                       higher_is_better=False, description="WikiText-2 perplexity, quick variant: first 16 windows "
                       "of 256 tokens (minutes on a CPU; not comparable with papers)",
                       seq_len=256, calib_samples=32, eval_samples=16, labelled_calibration=True,
                       data_layout=_WIKI_LAYOUT, protocol="quick"))
register(EmbeddingTask("pydocs-embedding", "embedding", "encoder", "base", ("embedding_cosine",), "embedding_cosine",
                       description="agreement of mean-pooled embeddings with the dense model (offline, no head)",
                       seq_len=128, calib_samples=256, eval_samples=256))
register(LmEvalTask("zeroshot", "lmeval", "causal", "causal-lm", ("mean_acc", "<task>/acc", "<task>/acc_norm",
                                                                "lambada_openai/perplexity"), "mean_acc",
                    description="zero-shot suite of the LLM-pruning papers: PIQA, ARC-e, WinoGrande, BoolQ, LAMBADA "
                                "(lm-eval's own definitions)",
                    seq_len=256, calib_samples=32, labelled_calibration=True, aliases=("zero-shot",),
                    lm_tasks=("piqa", "arc_easy", "winogrande", "boolq", "lambada_openai"),
                    data_layout="<data>/lm-eval/{piqa/validation,arc_easy/test,winogrande/validation,boolq/validation,"
                                "lambada_openai/test}.jsonl (else the hub)"))
register_prefix("lmeval", _lmeval_factory)
