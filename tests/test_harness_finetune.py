"""`harness finetune` on a tiny BERT and a tiny SST-2 fixture: deterministic, cached, recorded."""
from __future__ import annotations

import json

import pytest

from _harness_fixtures import glue_dir, tiny_bert_dir
from tshrink_harness.finetune import finetune


def _run(tmp_path, model, data, out, **kw):
    args = dict(task="sst2", model=str(model), output=str(out), epochs=2, batch_size=8, max_length=24,
                data_dir=str(data), seed=0, progress=False)
    return finetune(**(args | kw))


def test_finetune_is_deterministic_cached_and_recorded(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, data = tiny_bert_dir(tmp_path, head="base"), glue_dir(tmp_path)
    a = _run(tmp_path, model, data, tmp_path / "a")
    b = _run(tmp_path, model, data, tmp_path / "b")
    assert a["weights_hash"] == b["weights_hash"] and a["key"] == b["key"]  # same seed -> same weights
    assert a["train"]["steps"] == 6 and a["train"]["examples"] == 24 and a["train"]["warmup_steps"] == 0
    assert a["recipe"]["lr"] == 1e-4 and a["recipe"]["precision"] == "fp32"
    assert 0 <= a["dev_metrics"]["accuracy"] <= 1 and a["dev_evaluation"]["examples"] == 6
    saved = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert saved["key"] == a["key"] and saved["model"]["hash"] and saved["task"]["data_hash"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["finetuning_task"] == "sst2"
    # cached: same recipe + model + data reuses the checkpoint (no training)
    mtime = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    again = _run(tmp_path, model, data, tmp_path / "a")
    assert again == saved and "[cached]" in capsys.readouterr().out
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == mtime
    # another seed is another recipe: refused on the same output unless forced
    with pytest.raises(ValueError, match="different fine-tune"):
        _run(tmp_path, model, data, tmp_path / "a", seed=1)
    c = _run(tmp_path, model, data, tmp_path / "a", seed=1, force=True)
    assert c["weights_hash"] != a["weights_hash"]
    # the fine-tuned checkpoint is a valid --model for compare on the task
    from tshrink.models import load_model

    net, _ = load_model(str(tmp_path / "a"), head="sequence-classification")
    assert net.config.num_labels == 2


def test_finetune_sample_cap_and_regression_config(tmp_path, monkeypatch):
    monkeypatch.delenv("TSHRINK_DATA_DIR", raising=False)
    model, data = tiny_bert_dir(tmp_path, head="base"), glue_dir(tmp_path)
    rec = _run(tmp_path, model, data, tmp_path / "cap", epochs=1, max_train_samples=10, warmup_ratio=0.5)
    assert rec["train"]["examples"] == 10 and rec["train"]["steps"] == 2 and rec["train"]["warmup_steps"] == 1
    from tshrink_harness.tasks.registry import get_task
    from transformers import BertConfig

    config = BertConfig()
    get_task("stsb").configure_model(config)
    assert config.problem_type == "regression" and config.finetuning_task == "stsb"
