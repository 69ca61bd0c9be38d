"""Run EleutherAI lm-evaluation-harness tasks on an in-memory (possibly compressed) model.

The model object is wrapped in `lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer)` and evaluated with `lm_eval.simple_evaluate`, so pruned or quantized
models are evaluated as they are, without saving and reloading them.

Offline use: built-in lm-eval tasks download their data from the Hugging Face hub, which
cannot run here. Tasks whose YAML points at local files work offline, e.g.

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


@dataclass
class LmEvalResult:
    """Metrics per task plus lm-eval's full result dict."""

    metrics: dict[str, dict[str, float]]  # task -> {"acc,none": 0.25, ...} (numbers only)
    n_samples: dict[str, int]  # task -> documents evaluated (after `limit`)
    raw: dict[str, Any]  # what `lm_eval.simple_evaluate` returned


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], *,
                include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                limit: int | float | None = None, batch_size: int = 1, device: str = "cpu",
                num_fewshot: int | None = None, include_defaults: bool | None = None,
                bootstrap_iters: int = 0, max_length: int | None = None,
                log_samples: bool = False, env_info: bool = False) -> LmEvalResult:
    """Evaluate `model` (a transformers causal LM object) on lm-eval `tasks`.

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
    if include_defaults is False and include_path is None:
        raise ValueError("include_defaults=False needs include_path (otherwise no task is known)")
    paths = None
    if include_path is not None:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, os.PathLike))
                                  else include_path)]
        missing = [p for p in paths if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"include_path folder(s) {missing} do not exist")

    was_training = model.training
    model.to(device)
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        defaults = include_defaults if include_defaults is not None else paths is None
        manager = TaskManager(include_path=paths, include_defaults=defaults)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown and include_defaults is None and paths is not None:  # maybe built-in tasks
            manager = TaskManager(include_path=paths, include_defaults=True)
            unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {unknown}; check the names or include_path "
                             f"({len(manager.all_tasks)} tasks are known)")
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

