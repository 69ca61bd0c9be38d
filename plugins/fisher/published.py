"""What Kwon et al.'s public code (``WoosukKwon/retraining-free-pruning``) runs with, and
how a run's settings deviate from it. Pure data and comparisons: the plugin records the
result in ``report["fidelity"]`` so that every leaderboard row says "as published" or
names its deviations.

The reference settings, read from the public code (``main.py``, ``prune/*.py``):

- calibration: 2,048 training examples drawn WITH replacement (``np.random.choice``),
  dynamic padding; mask gradients in mini-batches of 32 (12 for SQuAD), i.e. 64 gradient
  rows for the Fisher matrix;
- FLOPs (MACs) priced at the dev set's average length (GLUE, e.g. MRPC 53.24, SST-2
  25.16) or 170 for SQuAD;
- mask tuning against the teacher "search mask at sqrt(constraint)", and, for sequence
  classification, only the [CLS] token in the last layer's MLP problem.

The public code covers BERT-style encoders only; for decoders there is no published
setting (``published_for`` returns None) and the run records the project's own choices.
"""
from __future__ import annotations

from typing import Any

REFERENCE = "WoosukKwon/retraining-free-pruning (public code of Kwon et al., NeurIPS 2022)"
CALIBRATION_EXAMPLES = 2048
GRAD_BATCH = {"classification": 32, "qa": 12}
TEACHER = "search-sqrt"
SQUAD_PRICING_LEN = 170


def task_kind(model: Any, causal: bool) -> str:
    """'classification', 'qa' or 'causal' from the model's head (class name) and family."""
    name = type(model).__name__
    if causal:
        return "causal"
    if name.endswith("ForQuestionAnswering"):
        return "qa"
    return "classification"


def published_for(kind: str) -> dict[str, Any] | None:
    """The public code's settings for a task kind; None where it has none (decoders)."""
    if kind == "causal":
        return None
    return {"calibration_examples": CALIBRATION_EXAMPLES, "sampling": "with replacement",
            "grad_batch_size": GRAD_BATCH[kind], "teacher": TEACHER, "cls_only": kind == "classification",
            "pricing": "170 tokens" if kind == "qa" else "the data's average length"}


def deviations(kind: str, used: dict[str, Any]) -> list[str]:
    """Human-readable differences between ``used`` and the published settings for ``kind``.

    ``used`` may hold any of: ``calibration_examples`` (int), ``sampling`` (str),
    ``grad_batch_size`` (int), ``teacher`` (str), ``cls_only`` (bool), ``pricing_len``
    (int, the cost model's length) with ``avg_len`` (float, the calibration data's mean
    real length). Keys that are absent are not compared (a stage reports what it knows).
    """
    ref = published_for(kind)
    if ref is None:
        return []
    out = []
    if "calibration_examples" in used and used["calibration_examples"] != ref["calibration_examples"]:
        out.append(f"{used['calibration_examples']} calibration examples (published {ref['calibration_examples']})")
    if "sampling" in used and used["sampling"] != ref["sampling"]:
        out.append(f"calibration drawn {used['sampling']} (published {ref['sampling']})")
    if "grad_batch_size" in used and used["grad_batch_size"] != ref["grad_batch_size"]:
        out.append(f"mask-gradient batches of {used['grad_batch_size']} (published {ref['grad_batch_size']})")
    if "teacher" in used and used["teacher"] != ref["teacher"]:
        out.append(f"tuning teacher {used['teacher']} (published {ref['teacher']})")
    if "cls_only" in used and used["cls_only"] != ref["cls_only"]:
        out.append(f"last-layer tuning on {'[CLS] only' if used['cls_only'] else 'every token'} "
                   f"(published {'[CLS] only' if ref['cls_only'] else 'every token'})")
    if "pricing_len" in used:
        want = SQUAD_PRICING_LEN if kind == "qa" else used.get("avg_len")
        if want is not None and used["pricing_len"] != round(want):
            out.append(f"FLOPs priced at {used['pricing_len']} tokens (published: {ref['pricing']}, "
                       f"{round(want)} here)")
    return out


def record(report: dict[str, Any], kind: str, used: dict[str, Any]) -> dict[str, Any]:
    """Merge one stage's ``used`` settings into ``report["fidelity"]`` and recompute the verdict."""
    fid = report.setdefault("fidelity", {"reference": REFERENCE, "kind": kind, "settings": {}})
    fid["settings"].update(used)
    ref = published_for(kind)
    fid["published"] = ref
    fid["deviations"] = deviations(kind, fid["settings"])
    fid["as_published"] = None if ref is None else not fid["deviations"]
    if ref is None:
        fid["note"] = "the public code covers BERT-style encoders only: no published decoder setting"
    return fid
