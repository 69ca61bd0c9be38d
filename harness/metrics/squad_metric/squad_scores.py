"""SQuAD v1.1 exact match and F1, as the official evaluation script v1.1 computes them.

Pure Python (no `evaluate`, no hub). This file is the computation behind the
`squad_metric` evaluate module and can be used directly:

    from tshrink_harness.metrics.squad_metric.squad_scores import squad_scores
    squad_scores(
        predictions=[{"id": "q1", "prediction_text": "the Eiffel Tower"}],
        references=[{"id": "q1", "answers": {"text": ["Eiffel Tower"], "answer_start": [0]}}],
    )  # {'exact_match': 100.0, 'f1': 100.0}

Answers are compared after `normalize_answer` (lower case, drop punctuation, drop the
articles a/an/the, collapse whitespace); a question scores the maximum over its gold
answers; both scores are percentages over all references. A reference without a
prediction scores 0 (as in the official script).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove articles (a, an, the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """True when both answers are equal after normalisation."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 (bag of normalised tokens) between one prediction and one gold answer."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_texts(answers: Any) -> list[str]:
    """Gold answer texts from {"text": [...]} (the HF layout), [{"text": ...}, ...] or [str, ...]."""
    if isinstance(answers, Mapping):
        texts = answers.get("text")
        if texts is None:
            raise ValueError(f"answers {answers!r} has no 'text' key; expected {{'text': [...], 'answer_start': [...]}}.")
        return [str(t) for t in texts]
    if isinstance(answers, (list, tuple)):
        return [str(a["text"]) if isinstance(a, Mapping) else str(a) for a in answers]
    raise ValueError(
        f"answers {answers!r} is not understood; expected {{'text': [...]}}, a list of "
        "{'text': ...} or a list of strings."
    )


def prediction_dict(predictions: Iterable[Mapping[str, Any]], text_key: str = "prediction_text") -> dict[str, Any]:
    """{id: prediction} from [{"id": ..., text_key: ...}, ...]; ValueError on a repeated id."""
    out: dict[str, Any] = {}
    for pred in predictions:
        if "id" not in pred or text_key not in pred:
            raise ValueError(f"prediction {pred!r} needs the keys 'id' and {text_key!r}.")
        qid = str(pred["id"])
        if qid in out:
            raise ValueError(f"prediction id {qid!r} appears more than once; give one prediction per question.")
        out[qid] = pred
    return out


def squad_scores(
    predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """SQuAD v1.1 {"exact_match": %, "f1": %} over all references.

    predictions: [{"id": str, "prediction_text": str}, ...]
    references: [{"id": str, "answers": {"text": [str, ...], "answer_start": [int, ...]}}, ...]
    """
    preds = prediction_dict(predictions)
    if not references:
        raise ValueError("references is empty; give at least one question.")
    exact = f1 = 0.0
    for ref in references:
        qid = str(ref["id"])
        golds = gold_texts(ref["answers"])
        if not golds:
            raise ValueError(
                f"question {qid!r} has no gold answer; SQuAD v1.1 needs at least one "
                "(use the squad_v2 metric for unanswerable questions)."
            )
        if qid not in preds:
            continue  # the official script scores a missing prediction as 0
        text = str(preds[qid]["prediction_text"])
        exact += max(float(exact_match_score(text, g)) for g in golds)
        f1 += max(f1_score(text, g) for g in golds)
    return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}
