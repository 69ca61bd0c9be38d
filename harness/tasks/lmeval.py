"""Run EleutherAI lm-evaluation-harness tasks on an in-memory (possibly compressed) model.

The model object is wrapped in `lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer)` and evaluated with `lm_eval.simple_evaluate`, so pruned or quantized
models are evaluated as they are, without saving and reloading them.

Offline use: lm-eval's own task definitions download their data from the Hugging Face hub.
:func:`local_task_config` takes such a definition unchanged (prompt, choices, target,
metrics) and only points its dataset at a local JSON-lines copy of the split it evaluates,
``<data dir>/lm-eval/<task>/<split>.jsonl`` (see :data:`LOCAL_DIR`). Tasks whose YAML
points at local files work offline too, e.g.

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/docs.jsonl}}
    test_split: test
    output_type: multiple_choice
    ...

passed with `include_path=<folder holding the YAML>`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


LOCAL_DIR = "lm-eval"  # under the data directory: <task>/<split>.jsonl, the schema of the hub dataset
#: the zero-shot suite of the LLM-pruning papers that has local copies (HellaSwag has none)
ZEROSHOT = ("piqa", "arc_easy", "winogrande", "boolq", "lambada_openai")
#: how the papers' tables name each task's column, and the metric in it (see README)
COLUMNS = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "winogrande": "WinoGrande",
           "boolq": "BoolQ", "lambada_openai": "LAMBADA", "hellaswag": "HellaSwag", "openbookqa": "OBQA"}


def task_manager(include_path: str | os.PathLike | None = None) -> Any:
    """lm-eval's TaskManager over its built-in task YAMLs (plus ``include_path``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(include_path)] if include_path else None, include_defaults=True)


def unknown_task_message(name: str, manager: Any, *, include: str | None = None) -> str:
    """One line: the unknown name, lm-eval's closest task names, how many are known."""
    import difflib

    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown lm-eval task {name!r}.{hint} ({len(manager.all_tasks)} tasks known to lm-eval"
            + (f", including those in {include}" if include else "") + "; local task YAMLs go in --lmeval-include DIR)")


def task_config(manager: Any, name: str) -> dict[str, Any]:
    """The full config of lm-eval's own definition of task ``name`` (includes merged,
    ``!function`` entries resolved), as lm-eval itself would build the task from it."""
    entry = manager.task_index[name]
    yaml_path = entry.yaml_path if hasattr(entry, "yaml_path") else entry.get("yaml_path")  # 0.4.13+ / older
    kind = str(getattr(entry, "kind", None) or entry.get("type", ""))
    if yaml_path is None or yaml_path == -1 or "group" in kind.lower() or "tag" in kind.lower():
        raise ValueError(f"lm-eval task {name!r} is not a single YAML-defined task (a group, tag or Python "
                         "task); name its member tasks instead")
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10

        cfg = load_yaml(yaml_path, resolve_func=True)
    except ImportError:  # older lm-eval
        from lm_eval.utils import load_yaml_config

        cfg = load_yaml_config(yaml_path=yaml_path, mode="full")
    for key in ("tag", "group", "task_list"):  # structural keys, not part of a task's config
        cfg.pop(key, None)
    if "task" not in cfg or "class" in cfg:
        raise ValueError(f"lm-eval task {name!r} is not a single YAML-defined task; name its member tasks instead")
    return cfg


def eval_split(cfg: dict[str, Any]) -> str:
    """The split lm-eval evaluates a task on: its test split if it has one, else validation."""
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise ValueError(f"lm-eval task {cfg.get('task')!r} has neither a test nor a validation split")
    return str(split)


def local_file(data_dir: str | os.PathLike, cfg: dict[str, Any]) -> "Path":
    """Where the local copy of a task's evaluation split is expected."""
    from pathlib import Path

    return Path(data_dir) / LOCAL_DIR / cfg["task"] / f"{eval_split(cfg)}.jsonl"


def local_task_config(cfg: dict[str, Any], file: str | os.PathLike) -> dict[str, Any]:
    """``cfg`` (lm-eval's own task config) with its dataset redirected to the JSON-lines
    ``file`` holding the evaluation split; prompt, target, choices and metrics unchanged.
    The other splits (training / few-shot sources) are dropped: the local copy holds only
    the evaluation split, and the zero-shot suite uses no few-shot examples."""
    split = eval_split(cfg)
    out = dict(cfg)
    out.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(file)}},
               training_split=None, fewshot_split=None,
               validation_split=split if cfg.get("validation_split") == split else None,
               test_split=split if cfg.get("test_split") == split else None)
    if out.get("num_fewshot"):
        raise ValueError(f"lm-eval task {cfg['task']!r} is defined with {out['num_fewshot']}-shot prompts; the local "
                         "copy holds no training split to draw them from")
    return out


@dataclass
class LmEvalResult:
    """Metrics per task plus lm-eval's full result dict."""

    metrics: dict[str, dict[str, float]]  # task -> {"acc,none": 0.25, ...} (numbers only)
    n_samples: dict[str, int]  # task -> documents evaluated (after `limit`)
    raw: dict[str, Any]  # what `lm_eval.simple_evaluate` returned


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str | dict[str, Any]], *,
                include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                limit: int | float | None = None, batch_size: int = 1, device: str = "cpu",
                num_fewshot: int | None = None, include_defaults: bool | None = None,
                bootstrap_iters: int = 0, max_length: int | None = None,
                log_samples: bool = False, env_info: bool = False) -> LmEvalResult:
    """Evaluate `model` (a transformers causal LM object) on lm-eval `tasks`: names, or
    full task configs (e.g. from :func:`local_task_config`).

    - `include_path`: folder(s) with extra task YAMLs (e.g. local, offline tasks).
    - `limit`: documents per task (int) or fraction of them (float < 1); for quick runs.
    - `device`: the model is moved there first (HFLM uses the model's own device).
    - `include_defaults`: also index lm-eval's built-in task YAMLs (thousands; about 20 s
      on a small CPU). None (default): only when some task is not found in `include_path`
      (always when there is no `include_path`).
    - `bootstrap_iters=0` skips bootstrap standard errors (lm-eval's default is 100000).
    - `max_length`: context length for HFLM (default: from the model config).
    - `log_samples=True` keeps lm-eval's per-document records in `raw["samples"]`.
    - `env_info=True` keeps lm-eval's environment report (pip list, ...: seconds per call).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be > 0 (or None for all documents)")
    named = [t for t in tasks if isinstance(t, str)]
    if include_defaults is False and include_path is None and named:
        raise ValueError("include_defaults=False needs include_path (otherwise no task is known)")
    paths = None
    if include_path is not None:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, os.PathLike))
                                  else include_path)]
        missing = [p for p in paths if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"include_path folder(s) {missing} do not exist")

    was_training = model.training
    if getattr(model, "hf_device_map", None) is None:  # a dispatched model (accelerate) stays where it is
        model.to(device)
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        # full configs need no index; names need lm-eval's (thousands of YAMLs: ~20 s on a small CPU)
        defaults = include_defaults if include_defaults is not None else (paths is None and bool(named))
        manager = TaskManager(include_path=paths, include_defaults=defaults)
        unknown = [t for t in tasks if isinstance(t, str) and t not in manager.all_tasks]
        if unknown and include_defaults is None and paths is not None:  # maybe built-in tasks
            manager = TaskManager(include_path=paths, include_defaults=True)
            unknown = [t for t in tasks if isinstance(t, str) and t not in manager.all_tasks]
        if unknown:
            raise ValueError(unknown_task_message(unknown[0], manager, include=", ".join(paths or []) or None))
        from contextlib import nullcontext
        from unittest import mock

        # lm-eval's environment report runs `pip list` etc. in subprocesses (~5 s a call on a
        # small CPU); tshrink records package versions itself, so it is skipped unless asked.
        quiet = nullcontext() if env_info else mock.patch("lm_eval.evaluator.add_env_info", lambda results: None)
        with quiet:
            raw = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  batch_size=batch_size, device=device, task_manager=manager,
                                  bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    finally:
        model.train(was_training)
    metrics = {  # numbers only: drops "alias" and "N/A" stderrs; sample_len is in n_samples
        task: {k: float(v) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"}
        for task, values in raw["results"].items()
    }
    n_samples = {task: int(n["effective"]) for task, n in raw.get("n-samples", {}).items()}
    return LmEvalResult(metrics=metrics, n_samples=n_samples, raw=raw)

