"""Shipped metrics against hand-computed values, directly and loaded through `evaluate` offline."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tshrink_harness.metrics import METRICS, metric_path
from tshrink_harness.metrics.glue_metric.glue_scores import canonical_config, glue_scores
from tshrink_harness.metrics.squad_metric import squad_scores as v1
from tshrink_harness.metrics.squad_v2_metric import squad_v2_scores as v2

# 2x2 table: TP=3, TN=2, FP=1, FN=2
REFS = [1, 1, 1, 1, 1, 0, 0, 0]
PREDS = [1, 1, 1, 0, 0, 1, 0, 0]
MCC = (3 * 2 - 1 * 2) / math.sqrt((3 + 1) * (3 + 2) * (2 + 1) * (2 + 2))  # 4 / sqrt(240)
F1 = 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)  # precision 3/4, recall 3/5 -> 2/3
ACC = 5 / 8
# x = [1,2,3,4], y = [2,4,5,4]: sum dx*dy = 3.5, sum dx^2 = 5, sum dy^2 = 4.75
PEARSON = 3.5 / math.sqrt(5 * 4.75)
# ranks of y = [1, 2.5, 4, 2.5]: sum dx*dr = 3, sum dr^2 = 4.5
SPEARMAN = 3 / math.sqrt(5 * 4.5)


# ---------------------------------------------------------------- GLUE
def test_glue_hand_values():
    assert glue_scores("cola", PREDS, REFS) == pytest.approx({"matthews_correlation": MCC})
    assert glue_scores("mrpc", PREDS, REFS) == pytest.approx({"accuracy": ACC, "f1": F1})
    assert glue_scores("QQP", PREDS, REFS) == pytest.approx({"accuracy": ACC, "f1": F1})
    assert glue_scores("stsb", [1, 2, 3, 4], [2, 4, 5, 4]) == pytest.approx({"pearson": PEARSON, "spearmanr": SPEARMAN})
    assert glue_scores("mnli-mm", [0, 1, 2, 2], [0, 2, 2, 1]) == {"accuracy": 0.5}
    assert glue_scores("cola", [1, 1, 1], [1, 0, 1]) == {"matthews_correlation": 0.0}  # constant prediction


def test_glue_config_names():
    assert [canonical_config(n) for n in ("SST-2", "sts-b", "mnli-m", "MNLI_MISMATCHED", "wnli")] == [
        "sst2", "stsb", "mnli_matched", "mnli_mismatched", "wnli"]
    with pytest.raises(ValueError, match="'default'.*Accepted: cola, sst2"):
        canonical_config("default")
    with pytest.raises(ValueError, match="differ in length"):
        glue_scores("sst2", [1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        glue_scores("rte", [], [])


# ---------------------------------------------------------------- SQuAD
@pytest.mark.parametrize(
    "text, expected",
    [("The Cat!", "cat"), ("  an   apple,\ta day ", "apple day"), ("Theory of an anthem", "theory of anthem"),
     ("the_cat", "thecat"), ("A.B.", "ab"), ("The the THE", ""), ("Señor's", "señors"), ("1,000", "1000")],
)
def test_squad_normalisation(text, expected):
    assert v1.normalize_answer(text) == expected
    assert v2.normalize_answer(text) == expected


def test_squad_v1_hand_values():
    # normalised pred [big, red, dog] vs gold [red, dog, barked]: 2 common -> P = R = 2/3
    assert v1.f1_score("the big red dog", "a red dog barked!") == pytest.approx(2 / 3)
    assert v1.f1_score("", "dog") == 0.0 and v1.exact_match_score("The Dog.", "dog")
    preds = [{"id": "q1", "prediction_text": "Red dog"}, {"id": "q2", "prediction_text": "the big red dog"}]
    refs = [{"id": "q1", "answers": {"text": ["cat", "a red dog"], "answer_start": [0, 5]}},
            {"id": "q2", "answers": {"text": ["red dog barked", "elephant"], "answer_start": [0, 9]}},
            {"id": "q3", "answers": {"text": ["missing"], "answer_start": [0]}}]  # no prediction: scores 0
    assert v1.squad_scores(preds, refs) == pytest.approx({"exact_match": 100 / 3, "f1": 100 * (1 + 2 / 3) / 3})
    with pytest.raises(ValueError, match="'q1' appears more than once"):
        v1.squad_scores(preds + preds[:1], refs)
    with pytest.raises(ValueError, match="no gold answer"):
        v1.squad_scores(preds, [{"id": "q1", "answers": {"text": [], "answer_start": []}}])


V2_PREDS = [{"id": "q1", "prediction_text": "Denver Broncos", "no_answer_probability": 0.1},
            {"id": "q2", "prediction_text": "", "no_answer_probability": 0.9},
            {"id": "q3", "prediction_text": "sky", "no_answer_probability": 0.6},
            {"id": "q4", "prediction_text": "something", "no_answer_probability": 0.7}]
V2_REFS = [{"id": "q1", "answers": {"text": ["Denver Broncos"], "answer_start": [0]}},
           {"id": "q2", "answers": {"text": [], "answer_start": []}},
           {"id": "q3", "answers": {"text": ["the blue sky"], "answer_start": [3]}},
           {"id": "q4", "answers": {"text": [], "answer_start": []}}]
# raw exact 1,1,0,0; raw f1 1,1,2/3,0 (q3: P=1, R=1/2). Threshold sweep (by probability
# 0.1 q1 +1, 0.6 q3 +0 / +2/3, 0.7 q4 -1, 0.9 q2 0) from the 2 no-answer questions.
V2_EXPECTED = {
    "exact": 50.0, "f1": 100 * (2 + 2 / 3) / 4, "total": 4,
    "HasAns_exact": 50.0, "HasAns_f1": 100 * (1 + 2 / 3) / 2, "HasAns_total": 2,
    "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
    "best_exact": 75.0, "best_exact_thresh": 0.1, "best_f1": 100 * (3 + 2 / 3) / 4, "best_f1_thresh": 0.6,
}


def test_squad_v2_hand_values():
    assert v2.compute_f1("", "") == 1.0 and v2.compute_f1("", "x") == 0.0
    out = v2.squad_v2_scores(V2_PREDS, V2_REFS)
    assert out == pytest.approx(V2_EXPECTED) and set(out) == set(V2_EXPECTED)
    # probabilities above 0.5 count as "no answer": q2 right, q3 wrong, q4 right
    forced = v2.squad_v2_scores(V2_PREDS, V2_REFS, no_answer_threshold=0.5)
    assert (forced["exact"], forced["f1"]) == pytest.approx((75.0, 75.0))
    only_answerable = v2.squad_v2_scores(V2_PREDS[:1], V2_REFS[:1])
    assert "NoAns_total" not in only_answerable and only_answerable["HasAns_total"] == 1
    with pytest.raises(ValueError, match="no prediction for question 'q4'"):
        v2.squad_v2_scores(V2_PREDS[:3], V2_REFS)


# ---------------------------------------------------------------- evaluate modules, offline
def test_metric_paths_and_packaging():
    from setuptools import find_packages

    for name, folder in METRICS.items():
        path = Path(metric_path(name))
        assert path.name == folder and (path / f"{folder}.py").is_file()
    assert metric_path("SQuAD-v2") == metric_path("squad_v2_metric")
    with pytest.raises(ValueError, match="Unknown metric 'glu'. Did you mean 'glue'"):
        metric_path("glu")
    # the folders are packages, so setup.py's find_packages ships their .py files
    harness = Path(metric_path("glue")).parents[1]
    assert {f"metrics.{f}" for f in METRICS.values()} <= set(find_packages(str(harness)))


EVALUATE_SCRIPT = textwrap.dedent("""
    import json, sys
    import tshrink_harness.metrics as M
    assert "evaluate" not in sys.modules, "tshrink_harness.metrics imported evaluate"
    args = json.loads(sys.argv[1])
    out = {
        "cola": M.load_metric("glue", "cola").compute(predictions=args["preds"], references=args["refs"]),
        "mrpc": M.load_metric("glue", "MRPC").compute(predictions=args["preds"], references=args["refs"]),
        "stsb": M.load_metric("glue", "STS-B").compute(predictions=[1.0, 2, 3, 4], references=[2.0, 4, 5, 4]),
        "squad": M.load_metric("squad").compute(predictions=args["v1_preds"][:1], references=args["v2_refs"][:1]),
        "squad_v2": M.load_metric("squad_v2").compute(predictions=args["v2_preds"], references=args["v2_refs"]),
    }
    m = M.load_metric("glue", "sst2")
    m.add_batch(predictions=[1, 0], references=[1, 1])
    m.add_batch(predictions=[0, 0], references=[0, 0])
    out["sst2_batches"] = m.compute()
    print(json.dumps(out))
""")


def test_evaluate_load_by_path_offline(tmp_path):
    pytest.importorskip("evaluate")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"), HF_METRICS_CACHE=str(tmp_path / "metrics"))
    v1_preds = [{"id": p["id"], "prediction_text": p["prediction_text"]} for p in V2_PREDS]
    args = {"preds": PREDS, "refs": REFS, "v1_preds": v1_preds, "v2_preds": V2_PREDS, "v2_refs": V2_REFS}
    proc = subprocess.run([sys.executable, "-c", EVALUATE_SCRIPT, json.dumps(args)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cola"] == pytest.approx({"matthews_correlation": MCC})
    assert out["mrpc"] == pytest.approx({"accuracy": ACC, "f1": F1})
    assert out["stsb"] == pytest.approx({"pearson": PEARSON, "spearmanr": SPEARMAN})
    assert out["squad"] == {"exact_match": 100.0, "f1": 100.0}
    assert v1.squad_scores(v1_preds[:1], V2_REFS[:1]) == out["squad"]
    assert out["squad_v2"] == pytest.approx(V2_EXPECTED)
    assert out["sst2_batches"] == {"accuracy": 0.75}
