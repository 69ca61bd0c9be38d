"""GLUE metric as an `evaluate` module, loadable by local path (works offline).

    import evaluate
    metric = evaluate.load("<path to>/harness/metrics/glue_metric", "mrpc")
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    # {'accuracy': 0.666..., 'f1': 0.8}

or `tshrink_harness.metrics.load_metric("glue", "mrpc")`. Same configs and keys as the
Hugging Face `glue` metric; task names are also accepted as "SST-2", "sts-b", "mnli-mm".
The computation lives in glue_scores.py (usable without evaluate).
"""
import datasets
import evaluate

from .glue_scores import TASK_METRICS, canonical_config, glue_scores

_DESCRIPTION = """GLUE scores: matthews_correlation (cola), pearson and spearmanr (stsb),
accuracy and binary F1 of class 1 (mrpc, qqp), accuracy (all other tasks)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class indices (int), or predicted similarity scores (float) for stsb.
    references: gold class indices (int), or gold similarity scores (float) for stsb.
Returns:
    dict with the keys of the task: matthews_correlation | pearson, spearmanr | accuracy[, f1].
Configs: """ + ", ".join(TASK_METRICS)

_CITATION = """@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    """The GLUE metric; the config name is the task."""

    def _info(self) -> evaluate.MetricInfo:
        task = canonical_config(self.config_name)  # ValueError for "default" or unknown names
        value = datasets.Value("float64" if task == "stsb" else "int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": value, "references": value}),
            reference_urls=["https://gluebenchmark.com/"],
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict:
        return glue_scores(self.config_name, predictions, references)
