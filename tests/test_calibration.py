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
    first = stream.run(keep=True)
    assert not any(isinstance(v, Cache) for kw in stream.kwargs for v in kw.values())
    assert torch.equal(first[0], stream.run(keep=True)[0])


# -- the stream holds nothing that grows with passes; padding does not change real tokens ----
CAUSAL = ("llama", "mistral", "qwen2", "opt")


def _padded(family: str, side: str, lens=(12, 7, 9), seq: int = 12, seed: int = 0):
    """(per-sequence unpadded calibration, one padded batch of the same sequences)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 97, (n,), generator=g) for n in lens]
    single = CalibrationData([{"input_ids": x[None], "attention_mask": torch.ones(1, len(x), dtype=torch.long)}
                              for x in seqs])
    ids = torch.full((len(seqs), seq), 1, dtype=torch.long)
    mask = torch.zeros(len(seqs), seq, dtype=torch.long)
    for i, x in enumerate(seqs):
        where = slice(seq - len(x), seq) if side == "left" else slice(0, len(x))
        ids[i, where], mask[i, where] = x, 1
    return single, CalibrationData([{"input_ids": ids, "attention_mask": mask}])


def _real_rows(adapter, calib):
    """Per layer: the MLP down-projection inputs at real tokens, (tokens, neurons)."""
    stream = LayerStream(adapter, calib)
    out = []
    for layer in range(adapter.num_layers):
        got = []
        with stream.capture(adapter.mlp(layer).out, lambda x, m: got.append(x[m])):
            stream.advance()
        out.append(torch.cat(got))
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fam,side", [(f, s) for f in CAUSAL for s in ("left", "right")] + [("bert", "right")])
def test_padded_calibration_matches_unpadded(fam, side, attn):
    """Real-token activations of every layer equal those of the unpadded sequences (encoders
    are right-padded only: their absolute positions start at the first token)."""
    model = tiny_model(fam)
    model.set_attn_implementation(attn)
    adapter = get_adapter(model)
    single, padded = _padded(fam, side)
    for ref, got in zip(_real_rows(adapter, single), _real_rows(adapter, padded)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fam", CAUSAL)
def test_layer_run_twice_is_identical_and_holds_no_cache(fam, attn):
    model = tiny_model(fam)
    model.set_attn_implementation(attn)
    adapter = get_adapter(model)
    _, padded = _padded(fam, "right")
    calib = CalibrationData(padded.batches + tiny_batches(fam).batches)
    stream = LayerStream(adapter, calib)
    for kwargs in stream.kwargs:
        assert not any(k in kwargs for k in ("cache", "past_key_values", "past_key_value", "use_cache"))
    held = stream.held_bytes()
    first = stream.run(keep=True)
    for _ in range(3):
        assert stream.run() is None  # capture-only: nothing copied back
        assert stream.held_bytes() == held
    second = stream.run(keep=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    stream.advance()
    stream.run()
    assert stream.held_bytes() == held  # hidden states replaced, same size: nothing accumulates
    stream.advance()
    assert stream.held_bytes() == held
