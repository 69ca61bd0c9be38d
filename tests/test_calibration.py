"""Layer-by-layer streaming against the model's own hidden states."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.calibration import CalibrationData, LayerStream


def test_stream_reproduces_hidden_states(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    calib = tiny_batches(family)
    with torch.no_grad():
        ref = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
               for b in calib.batches]
    stream = LayerStream(adapter, calib)
    for layer in range(adapter.num_layers):
        for i, h in enumerate(stream.hidden):
            torch.testing.assert_close(h, ref[i][layer], rtol=1e-5, atol=1e-5)
        seen = []
        with stream.capture(adapter.mlp(layer).out, lambda x, m: seen.append((x.shape, m.shape))):
            stream.run()
        assert len(seen) == len(calib.batches)
        assert seen[0][0][-1] == adapter.mlp(layer).neurons and seen[0][1] == calib.batches[0]["attention_mask"].shape
        if layer < adapter.num_layers - 1:  # the last layer's output goes through a final norm in decoders
            stream.advance()


def test_empty_calibration_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        CalibrationData([], source="nothing")


def test_layer_stream_keeps_no_kv_cache_that_grows_with_passes():
    """transformers 5 hands decoder layers the KV cache as `cache`: it must not be kept, or every
    pass over a layer appends its keys/values to it (memory growing with passes)."""
    from transformers.cache_utils import Cache

    from conftest import tiny_model
    from tshrink.arch.families import get_adapter
    from tshrink.calibration import CalibrationData, LayerStream

    adapter = get_adapter(tiny_model("llama", "causal-lm"))
    ids = torch.randint(5, 90, (2, 8))
    stream = LayerStream(adapter, CalibrationData([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]))
    first = stream.run()
    assert not any(isinstance(v, Cache) for kw in stream.kwargs for v in kw.values())
    assert torch.equal(first[0], stream.run()[0])
