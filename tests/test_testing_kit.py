"""tshrink.testing: the plugin authors' kit (tiny models with tokenizers, calibration data)."""
from __future__ import annotations

import pytest
import torch

from tshrink.calibration import model_inputs
from tshrink.testing import CAUSAL, FAMILIES, tiny_calibration, tiny_model_dir


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_dirs_load_and_run_on_their_tokenizers_data(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_model_dir(family, tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    auto = AutoModelForCausalLM if family in CAUSAL else AutoModelForSequenceClassification
    model = auto.from_pretrained(path).eval()
    calib = tiny_calibration(family, tok)
    assert calib.has_labels and calib.n_tokens > 0
    batch = calib.batches[0]
    assert int(batch["input_ids"].max()) < model.config.vocab_size
    with torch.no_grad():
        out = model(**model_inputs(batch, labels=True))
    assert torch.isfinite(out.loss)


def test_unknown_family_is_one_clear_error():
    from tshrink.testing import tiny_model

    with pytest.raises(ValueError, match=r"family 'gpt9' is not one of \('bert'"):
        tiny_model("gpt9")
