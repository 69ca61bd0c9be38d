"""SQuAD v1.1 metric as an `evaluate` module, loadable by local path (works offline).

    import evaluate
    metric = evaluate.load("<path to>/harness/metrics/squad_metric")
    metric.compute(
        predictions=[{"id": "q1", "prediction_text": "Denver Broncos"}],
        references=[{"id": "q1", "answers": {"text": ["Denver Broncos"], "answer_start": [177]}}],
    )  # {'exact_match': 100.0, 'f1': 100.0}

or `tshrink_harness.metrics.load_metric("squad")`. Same inputs and keys as the Hugging
Face `squad` metric; the computation lives in squad_scores.py (usable without evaluate).
"""
import datasets
import evaluate

from .squad_scores import squad_scores

_DESCRIPTION = """SQuAD v1.1 exact match and token F1 (percent), with the official answer
normalisation (lower case, no punctuation, no articles a/an/the, single spaces); each
question scores the best match over its gold answers."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": [str, ...], "answer_start": [int, ...]}}.
Returns:
    {"exact_match": float, "f1": float}, both in percent over all references; a reference
    without a prediction scores 0.
"""

_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
  title={{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={Proceedings of EMNLP},
  year={2016}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadMetric(evaluate.Metric):
    """The SQuAD v1.1 metric."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
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

    def _compute(self, predictions, references) -> dict:
        return squad_scores(predictions, references)
