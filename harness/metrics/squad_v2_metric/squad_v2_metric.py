"""SQuAD v2.0 metric as an `evaluate` module, loadable by local path (works offline).

    import evaluate
    metric = evaluate.load("<path to>/harness/metrics/squad_v2_metric")
    metric.compute(
        predictions=[{"id": "q1", "prediction_text": "", "no_answer_probability": 0.9}],
        references=[{"id": "q1", "answers": {"text": [], "answer_start": []}}],
    )  # {'exact': 100.0, 'f1': 100.0, 'total': 1, 'NoAns_exact': 100.0, ...}

or `tshrink_harness.metrics.load_metric("squad_v2")`. Same inputs and keys as the Hugging
Face `squad_v2` metric (compute(..., no_answer_threshold=1.0)); the computation lives in
squad_v2_scores.py (usable without evaluate).
"""
import datasets
import evaluate

from .squad_v2_scores import squad_v2_scores

_DESCRIPTION = """SQuAD v2.0 exact and F1 (percent) with the official normalisation; "" is the
no-answer prediction. Also the HasAns / NoAns breakdown and the best no-answer thresholds."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str, "no_answer_probability": float}
        ("" = no answer; use 0.0 as the probability when the model gives none).
    references: list of {"id": str, "answers": {"text": [str, ...], "answer_start": [int, ...]}}
        (empty lists = unanswerable question).
    no_answer_threshold: a prediction counts as "no answer" when its probability is above this (1.0).
Returns:
    exact, f1, total, HasAns_exact, HasAns_f1, HasAns_total, NoAns_exact, NoAns_f1, NoAns_total
    (a breakdown only when that kind of question occurs), best_exact, best_exact_thresh,
    best_f1, best_f1_thresh.
"""

_CITATION = """@inproceedings{rajpurkar-etal-2018-know,
  title={Know What You Don{'}t Know: Unanswerable Questions for {SQ}u{AD}},
  author={Rajpurkar, Pranav and Jia, Robin and Liang, Percy},
  booktitle={Proceedings of ACL},
  year={2018}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadV2Metric(evaluate.Metric):
    """The SQuAD v2.0 metric."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                        "no_answer_probability": datasets.Value("float64"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references, no_answer_threshold: float = 1.0) -> dict:
        return squad_v2_scores(predictions, references, no_answer_threshold=no_answer_threshold)
