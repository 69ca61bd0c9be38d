"""Evaluation tasks by name: which model they take, how they calibrate, how they evaluate.

A task is an object with a fixed interface (:class:`Task`); the harness never branches on
a task's name. Names: every GLUE task (``sst2``, ``mrpc``, ``stsb``, ``rte``, ``cola``,
``qqp``, ``mnli``, ``mnli_mismatched``, ``qnli``, ``wnli``; spellings like ``SST-2`` work),
``squad`` (v1.1) and ``squad_v2``, ``wikitext2`` (perplexity, the papers' standard protocol) and
``wikitext2-quick`` (its short-window variant),
``lmeval:<lm-eval task>[,<task>...]`` and ``zeroshot`` (lm-eval's PIQA, ARC-e, WinoGrande, BoolQ,
LAMBADA with local data), and the offline built-ins ``pydocs`` (perplexity on the Python
documentation, the default for decoders), ``pydocs-embedding`` (agreement of an
encoder's mean-pooled embeddings with the dense model's, the default for encoders) and
``translation`` (corpus BLEU of an encoder-decoder such as Marian on local parallel text,
the default for seq2seq models).

Lifecycle: ``get_task(name)`` -> ``check_model(config)`` -> ``prepare(data_dir)`` (reads and
checks the data: every "file missing" error happens here, before a model is loaded) ->
``calibration(...)`` / ``on_dense(...)`` / ``evaluate(...)``.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

KINDS = ("encoder", "causal", "seq2seq")


@dataclass
class EvalResult:
    """Numbers (``metrics``) and how they were obtained (``info``: split, examples, protocol)."""

    metrics: dict[str, float]
    info: dict[str, Any]


def data_hash(obj: Any) -> str:
    """A short, stable hash of JSON-serialisable data (examples, texts)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_kind(config: Any) -> str | None:
    """'encoder', 'causal' or 'seq2seq' (encoder-decoder: Marian, BART, T5) for a Hugging
    Face config, None when unknown."""
    from tshrink.arch.families import ADAPTERS

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    for cls in ADAPTERS:
        if getattr(config, "model_type", None) in cls.model_types:
            return "causal" if cls.causal else "encoder"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal"
    return None


@dataclass
class Task:
    """Base class; subclasses fill in data handling. Defaults are sized for 2 CPU cores."""

    name: str
    kind: str  # "glue" | "squad" | "perplexity" | "embedding" | "lmeval" | "translation"
    model_kind: str  # "encoder" | "causal" | "seq2seq"
    head: str  # model head to load (tshrink.models.HEADS)
    metrics: tuple[str, ...]
    main_metric: str
    higher_is_better: bool = True
    description: str = ""
    seq_len: int = 128  # default sequence length (calibration, FLOPs, evaluation, latency)
    calib_samples: int = 256  # default calibration examples / windows
    eval_samples: int | None = None  # default evaluation cap (None: the whole split)
    labelled_calibration: bool = False  # calibration batches carry the task loss's labels
    finetunable: bool = False
    num_labels: int | None = None
    data_layout: str = "no files (built in)"
    aliases: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)  # filled by prepare(): files, split, hash

    # -- checks, before any work ----------------------------------------------------
    def configure(self, **options: Any) -> None:
        """Task options from the command line; an option given to a task it does not
        apply to is an error (None means "not given")."""
        for key, value in options.items():
            if value is not None:
                raise ValueError(f"--{key.replace('_', '-')} does not apply to task {self.name!r}")

    def check_model(self, config: Any, spec: str) -> None:
        """ValueError when the model cannot do this task (wrong kind or head)."""
        kind = config_kind(config)
        if kind is not None and kind != self.model_kind:
            what = {"encoder": "an encoder", "causal": "a decoder (causal LM)",
                    "seq2seq": "an encoder-decoder (seq2seq) model"}
            others = ", ".join(n for n in task_names() if _TASKS[n].model_kind == kind) + ", lmeval:<name>" * (kind == "causal")
            raise ValueError(f"task {self.name!r} ({self.kind}) needs {what[self.model_kind]}; model {spec!r} "
                             f"({config.model_type}) is {what[kind]}. Tasks for it: {others}")

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        """Read (and check) the data; fill ``self.info``. Built-in tasks need nothing."""
        self.info = {"task": self.name, "data_hash": data_hash(self.name)}

    # -- work -------------------------------------------------------------------------
    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        raise NotImplementedError

    def on_dense(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> None:
        """Called once with the dense model before any evaluation (reference outputs)."""

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        raise NotImplementedError

    # -- fine-tuning (encoder tasks) -----------------------------------------------------
    def finetune_rows(self, tokenizer: Any, *, max_length: int, limit: int | None, seed: int) -> list[dict[str, Any]]:
        raise ValueError(f"task {self.name!r} cannot be fine-tuned; fine-tunable tasks: "
                         + ", ".join(n for n in task_names() if _TASKS[n].finetunable))

    def collate(self, rows: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        raise NotImplementedError

    def configure_model(self, config: Any) -> None:
        """Set task facts (labels, problem type) on a config before fine-tuning."""

    def row(self) -> dict[str, str]:
        """One line of ``harness tasks``."""
        return {"task": self.name, "kind": self.kind, "model": self.model_kind, "head": self.head,
                "metrics": ", ".join(self.metrics), "main": self.main_metric, "data": self.data_layout}


@dataclass
class SuiteTask(Task):
    """Several tasks evaluated on the same pruned model (``--task wikitext2+zeroshot``: the
    papers' table of perplexity and zero-shot accuracy from one prune). Calibration, sequence
    length and default evaluation limit come from the first task; metrics of a task are named
    ``<task>/<metric>`` unless they already carry a task prefix (lm-eval's ``piqa/acc``); the
    main metric is the last task's."""

    parts: tuple[Task, ...] = ()

    @classmethod
    def of(cls, parts: list[Task]) -> "SuiteTask":
        kinds = {p.model_kind for p in parts}
        if len(kinds) > 1 or len({p.head for p in parts}) > 1:
            raise ValueError(f"tasks {[p.name for p in parts]} need different models ({sorted(kinds)}); "
                             "a '+' suite needs tasks for the same model head")
        first, last = parts[0], parts[-1]
        metrics = tuple(m if "/" in m else f"{first.name}/{m}" for m in first.metrics) + tuple(last.metrics)
        main = last.main_metric if "/" in last.main_metric or last.main_metric == "mean_acc" else f"{last.name}/{last.main_metric}"
        return cls("+".join(p.name for p in parts), "suite", first.model_kind, first.head, metrics, main,
                   higher_is_better=last.higher_is_better, description=" + ".join(p.description for p in parts),
                   seq_len=first.seq_len, calib_samples=first.calib_samples, eval_samples=first.eval_samples,
                   labelled_calibration=first.labelled_calibration, num_labels=first.num_labels,
                   data_layout="; ".join(p.data_layout for p in parts), parts=tuple(parts))

    def check_model(self, config: Any, spec: str) -> None:
        for p in self.parts:
            p.check_model(config, spec)

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        for i, p in enumerate(self.parts):
            p.prepare(data_dir, need_train=need_train and i == 0)
        self.info = {"task": self.name, "split": " + ".join(str(p.info.get("split", p.name)) for p in self.parts),
                     "parts": {p.name: p.info for p in self.parts},
                     "data_hash": data_hash([p.info.get("data_hash") for p in self.parts])}

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        return self.parts[0].calibration(tokenizer, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size)

    def on_dense(self, model: Any, tokenizer: Any, **kw: Any) -> None:
        for p in self.parts:
            p.on_dense(model, tokenizer, **kw)

    def evaluate(self, model: Any, tokenizer: Any, **kw: Any) -> EvalResult:
        metrics: dict[str, float] = {}
        info: dict[str, Any] = {"split": self.info.get("split"), "parts": {}, "columns": []}
        for p in self.parts:
            ev = p.evaluate(model, tokenizer, **kw)
            named = {k if "/" in k or k == "mean_acc" else f"{p.name}/{k}": v for k, v in ev.metrics.items()}
            metrics.update(named)
            info["parts"][p.name] = ev.info
            label = {"wikitext2": "WikiText-2", "wikitext2-quick": "WikiText-2 (quick)"}.get(p.name, p.name)
            info["columns"] += ev.info.get("columns") or [
                {"column": f"{label} {'ppl' if p.main_metric == 'perplexity' else p.main_metric}",
                 "metric": f"{p.name}/{p.main_metric}"}]
            for key in ("documents", "limit", "kv_cache_bytes_per_token"):
                if key in ev.info and key not in info:
                    info[key] = ev.info[key]
        info["main_metric"] = self.main_metric
        return EvalResult(metrics, info)


_TASKS: dict[str, Task] = {}
_FACTORIES: dict[str, Callable[[str], Task]] = {}  # prefix (e.g. "lmeval") -> factory


def register(task: Task) -> None:
    _TASKS[task.name] = task


def register_prefix(prefix: str, factory: Callable[[str], Task]) -> None:
    _FACTORIES[prefix] = factory


def _load_builtin() -> None:
    from . import encoder_tasks, lm_tasks, translation  # noqa: F401  (they register themselves on first import)


def task_names() -> list[str]:
    """Registered task names: encoder tasks first, then decoder tasks, each in registration order."""
    _load_builtin()
    return sorted(_TASKS, key=lambda n: (KINDS.index(_TASKS[n].model_kind), list(_TASKS).index(n)))


def get_task(name: str, **options: Any) -> Task:
    """A fresh task object for ``name`` (options: ``lmeval_include``, ``squad_split``,
    ``num_beams``, ``max_new_tokens``; None = not given)."""
    import copy

    _load_builtin()
    if "+" in name:  # several tasks evaluated on the same pruned model, e.g. wikitext2+zeroshot
        parts = [p.strip() for p in name.split("+")]
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"task {name!r}: join task names with '+', e.g. wikitext2+zeroshot")
        return SuiteTask.of([get_task(p, **options) for p in parts])
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix not in _FACTORIES:
            raise ValueError(_unknown(name))
        if not rest:
            raise ValueError(f"task {name!r}: give the {prefix} task after the colon, e.g. {prefix}:hellaswag")
        return _FACTORIES[prefix](rest, **options)
    key = _normalise(name)
    for task in _TASKS.values():
        if key in {_normalise(task.name), *map(_normalise, task.aliases)}:
            fresh = copy.deepcopy(task)
            fresh.configure(**options)
            return fresh
    raise ValueError(_unknown(name))


def default_task(model_kind: str, data_dir: Path | None) -> str:
    """The task when none is given: built-in text (offline, minutes on 2 CPU cores); for
    decoders WikiText-2's quick variant when the data directory holds it; for
    encoder-decoders translation (which needs local parallel text)."""
    _load_builtin()
    if model_kind == "encoder":
        return "pydocs-embedding"
    if model_kind == "seq2seq":
        return "translation"
    from .lm_tasks import WikiText2Task

    return "wikitext2-quick" if data_dir is not None and WikiText2Task.present(data_dir) else "pydocs"


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _unknown(name: str) -> str:
    known = task_names() + [f"{p}:<name>" for p in _FACTORIES]
    close = difflib.get_close_matches(name.lower(), task_names() + list(_FACTORIES), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown task {name!r}.{hint} Known tasks: {', '.join(known)} (see `harness tasks`)."
