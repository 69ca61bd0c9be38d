"""SQuAD v2.0 scores, as the official evaluation script v2.0 computes them.

Pure Python (no `evaluate`, no hub); the computation behind the `squad_v2_metric` evaluate
module, usable directly:

    from tshrink_harness.metrics.squad_v2_metric.squad_v2_scores import squad_v2_scores

An empty prediction "" means "no answer"; a question with an empty list of gold answers
is unanswerable and only "" matches it (gold answers that normalise to nothing are
compared as ""). Each prediction also carries
`no_answer_probability`: a question counts as answered "no answer" when that
probability is above `no_answer_threshold` (default 1.0, i.e. never, as in the official
script). Returned, all in percent except totals and thresholds:

    exact, f1, total                       over every question
    HasAns_exact, HasAns_f1, HasAns_total  over answerable questions (when there are any)
    NoAns_exact, NoAns_f1, NoAns_total     over unanswerable questions (when there are any)
    best_exact, best_exact_thresh          best exact over all no-answer-probability cut-offs
    best_f1, best_f1_thresh                and the cut-off that reaches it (official search)

The normalisation is the one of SQuAD v1.1; it is repeated here (not imported from
squad_metric) so that this file stays a self-contained evaluate module.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

# The v2.0 script normalises answers exactly as v1.1 does: share one implementation.
from tshrink_harness.metrics.squad_metric.squad_scores import f1_score, gold_texts, normalize_answer


def compute_exact(gold: str, prediction: str) -> int:
    """1 when gold and prediction are equal after normalisation, else 0."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def compute_f1(gold: str, prediction: str) -> float:
    """Token F1; when either side is empty (no answer) it is 1.0 if both are, else 0.0."""
    if not normalize_answer(gold) or not normalize_answer(prediction):
        return float(normalize_answer(gold) == normalize_answer(prediction))
    return f1_score(prediction, gold)


def _best_threshold(
    preds: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float], has_ans: Mapping[str, bool]
) -> tuple[float, float]:
    """Official search: sweep the cut-off over the sorted no-answer probabilities."""
    cur = best = float(sum(1 for q in has_ans if not has_ans[q]))
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda q: na_probs[q]):
        if has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1.0 if preds[qid] else 0.0
        cur += diff
        if cur > best:
            best, best_thresh = cur, na_probs[qid]
    return 100.0 * best / len(scores), float(best_thresh)


def squad_v2_scores(
    predictions: Sequence[Mapping[str, Any]],
    references: Sequence[Mapping[str, Any]],
    no_answer_threshold: float = 1.0,
) -> dict[str, float]:
    """SQuAD v2.0 scores (see the module docstring for the keys).

    predictions: [{"id": str, "prediction_text": str, "no_answer_probability": float}, ...]
        ("no_answer_probability" may be left out: 0.0).
    references: [{"id": str, "answers": {"text": [str, ...], "answer_start": [int, ...]}}, ...]
        (empty "text" list = unanswerable).
    Every reference needs a prediction (the official script fails otherwise): a missing
    one raises ValueError naming it.
    """
    if not references:
        raise ValueError("references is empty; give at least one question.")
    preds: dict[str, str] = {}
    na_probs: dict[str, float] = {}
    for pred in predictions:
        if "id" not in pred or "prediction_text" not in pred:
            raise ValueError(f"prediction {pred!r} needs the keys 'id' and 'prediction_text'.")
        qid = str(pred["id"])
        if qid in preds:
            raise ValueError(f"prediction id {qid!r} appears more than once; give one prediction per question.")
        preds[qid] = str(pred["prediction_text"])
        na_probs[qid] = float(pred.get("no_answer_probability", 0.0))

    has_ans: dict[str, bool] = {}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for ref in references:
        qid = str(ref["id"])
        if qid not in preds:
            raise ValueError(f"no prediction for question {qid!r}; give one for every reference ('' = no answer).")
        texts = gold_texts(ref["answers"])
        has_ans[qid] = bool(texts)  # official: answerable = non-empty answer list
        golds = [g for g in texts if normalize_answer(g)] or [""]  # unanswerable: only "" is right
        exact_raw[qid] = float(max(compute_exact(g, preds[qid]) for g in golds))
        f1_raw[qid] = max(compute_f1(g, preds[qid]) for g in golds)

    def thresholded(raw: dict[str, float]) -> dict[str, float]:
        return {q: float(not has_ans[q]) if na_probs[q] > no_answer_threshold else s for q, s in raw.items()}

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)

    def summary(qids: list[str], prefix: str = "") -> dict[str, float]:
        n = len(qids)
        return {
            f"{prefix}exact": 100.0 * sum(exact[q] for q in qids) / n,
            f"{prefix}f1": 100.0 * sum(f1[q] for q in qids) / n,
            f"{prefix}total": n,
        }

    out = summary(list(has_ans))
    answerable = [q for q in has_ans if has_ans[q]]
    unanswerable = [q for q in has_ans if not has_ans[q]]
    if answerable:
        out.update(summary(answerable, "HasAns_"))
    if unanswerable:
        out.update(summary(unanswerable, "NoAns_"))
    # the search runs over the questions that have a reference (extra predictions are ignored),
    # in prediction order like the official script (it decides between tied probabilities)
    ref_probs = {q: na_probs[q] for q in na_probs if q in has_ans}
    ref_preds = {q: preds[q] for q in has_ans}
    out["best_exact"], out["best_exact_thresh"] = _best_threshold(ref_preds, exact_raw, ref_probs, has_ans)
    out["best_f1"], out["best_f1_thresh"] = _best_threshold(ref_preds, f1_raw, ref_probs, has_ans)
    return out
