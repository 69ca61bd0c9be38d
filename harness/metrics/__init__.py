"""Metrics shipped inside the package as `evaluate` modules, loadable by local path.

`evaluate.load("glue", ...)` needs the Hugging Face hub; these folders do not, so they
behave the same online and offline:

    from tshrink_harness.metrics import load_metric
    load_metric("glue", "mrpc").compute(predictions=[1, 0], references=[1, 1])

Each folder (glue_metric/, squad_metric/, squad_v2_metric/) holds the evaluate script and
a plain module with the computation (glue_scores.py, squad_scores.py, squad_v2_scores.py)
that can be used without evaluate. Nothing heavy is imported here.
"""
from __future__ import annotations

import os
import re
from difflib import get_close_matches
from typing import Any

# short name -> folder (the folder holds <folder>.py, as evaluate.load(path) expects)
METRICS: dict[str, str] = {"glue": "glue_metric", "squad": "squad_metric", "squad_v2": "squad_v2_metric"}


def _canonical(name: str) -> str:
    key = re.sub(r"[\s-]+", "_", str(name).strip().lower())
    key = key[: -len("_metric")] if key.endswith("_metric") else key
    key = {"squadv2": "squad_v2", "squad_v1": "squad", "squad_v1.1": "squad", "squad_v11": "squad"}.get(key, key)
    if key in METRICS:
        return key
    close = get_close_matches(key, list(METRICS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown metric {name!r}.{hint} Available: {', '.join(METRICS)}.")


def metric_path(name: str) -> str:
    """Absolute path of the folder of a shipped metric ("glue", "squad", "squad_v2").

    The result can be given to `evaluate.load`; ValueError names unknown metrics.
    """
    folder = METRICS[_canonical(name)]
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), folder)


def load_metric(name: str, config_name: str | None = None, **kwargs: Any):
    """`evaluate.load` of a shipped metric by its local path (no hub access needed).

    config_name: the GLUE task for "glue" (e.g. "sst2", "SST-2", "mnli-mm"); unused otherwise.
    kwargs go to `evaluate.load` (e.g. keep_in_memory=True, experiment_id=...).
    """
    import evaluate  # heavy: imported only when a metric is loaded

    path = metric_path(name)
    if config_name is None and _canonical(name) == "glue":
        raise ValueError("The glue metric needs the task as config_name, e.g. load_metric('glue', 'sst2').")
    if config_name is None:
        return evaluate.load(path, **kwargs)
    return evaluate.load(path, config_name, **kwargs)
