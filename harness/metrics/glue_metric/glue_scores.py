"""GLUE scores computed with numpy, scipy and scikit-learn (no `evaluate`, no hub).

This file is the computation behind the `glue_metric` evaluate module (imported there
as a local module, so evaluate copies it next to the script) and can be used directly:

    from tshrink_harness.metrics.glue_metric.glue_scores import glue_scores
    glue_scores("mrpc", predictions=[1, 0, 1], references=[1, 1, 1])
    # {'accuracy': 0.666..., 'f1': 0.8}

Keys and definitions are those of the Hugging Face `glue` metric:
cola -> matthews_correlation; stsb -> pearson, spearmanr; mrpc, qqp -> accuracy, f1
(binary F1 of class 1); every other task -> accuracy.
"""
from __future__ import annotations

import re
from difflib import get_close_matches
from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

# Configuration names of the Hugging Face `glue` metric -> the keys it returns.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "hans": ("accuracy",),
}

# Spellings accepted besides the canonical names, compared after lower-casing and
# dropping everything that is not a letter or digit ("SST-2" -> "sst2").
_ALIASES = {
    "mnlim": "mnli_matched",
    "mnlimatched": "mnli_matched",
    "mnlimm": "mnli_mismatched",
    "mnlimismatched": "mnli_mismatched",
}


def canonical_config(name: str) -> str:
    """Map a task name such as "SST-2", "sts-b" or "mnli-mm" to its metric config name.

    Raises ValueError naming the bad value, a close match and the accepted names.
    """
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    table = {re.sub(r"[^a-z0-9]", "", c): c for c in TASK_METRICS}
    table.update(_ALIASES)
    if key in table:
        return table[key]
    close = get_close_matches(str(name).lower(), list(TASK_METRICS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown GLUE metric config {name!r}.{hint} Accepted: {', '.join(TASK_METRICS)} "
        "(case, '-' and '_' are ignored; 'mnli-m' / 'mnli-mm' also work)."
    )


def _as_arrays(predictions: Sequence, references: Sequence, dtype) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions, dtype=dtype).reshape(-1)
    refs = np.asarray(references, dtype=dtype).reshape(-1)
    if preds.shape != refs.shape:
        raise ValueError(
            f"predictions and references differ in length ({preds.size} vs {refs.size}); "
            "give one prediction per reference."
        )
    if preds.size == 0:
        raise ValueError("predictions and references are empty; give at least one example.")
    return preds, refs


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to their reference."""
    preds, refs = _as_arrays(predictions, references, np.int64)
    return float((preds == refs).mean())


def binary_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """F1 of the positive class 1 (scikit-learn's binary F1); 0.0 when there is no positive."""
    preds, refs = _as_arrays(predictions, references, np.int64)
    return float(f1_score(refs, preds, zero_division=0.0))


def matthews_correlation(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation coefficient; 0.0 when predictions or references are constant."""
    preds, refs = _as_arrays(predictions, references, np.int64)
    return float(matthews_corrcoef(refs, preds))


def pearson_spearman(predictions: Sequence[float], references: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (nan when either side is constant, as scipy gives)."""
    preds, refs = _as_arrays(predictions, references, np.float64)
    if preds.size < 2:
        raise ValueError(f"correlations need at least 2 examples, got {preds.size}.")
    return {"pearson": float(pearsonr(preds, refs)[0]), "spearmanr": float(spearmanr(preds, refs)[0])}


def glue_scores(task: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Scores of one GLUE task, keyed as the Hugging Face `glue` metric keys them.

    predictions / references: class indices (int), or similarity scores (float) for stsb.
    """
    config = canonical_config(task)
    if config == "stsb":
        return pearson_spearman(predictions, references)
    if config == "cola":
        return {"matthews_correlation": matthews_correlation(predictions, references)}
    if config in ("mrpc", "qqp"):
        return {"accuracy": accuracy(predictions, references), "f1": binary_f1(predictions, references)}
    return {"accuracy": accuracy(predictions, references)}
