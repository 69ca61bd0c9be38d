"""The families added after the first four, through every structured method end to end.

The per-family contract of the toolkit's parts (masked == pruned, cost vs fvcore, save /
reload) runs over all families in test_surgery.py / test_cost.py; here each newer family
goes once through ``tshrink.prune`` with each structured method (scores, selection,
correction on its real layout) and is saved and reloaded.
"""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.checkpoint import load_pruned, read_manifest, save_pruned
from tshrink.pipeline import prune

NEW = ("qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox")
STRUCTURED = ("magnitude", "stat", "fisher")


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("family", NEW)
def test_structured_method_on_family(family, method, tmp_path):
    model = tiny_model(family, head="causal-lm")
    calib = tiny_batches(family, labels="lm")
    batch = calib.batches[0]
    before = get_adapter(model).widths()
    rep = prune(model, method, 0.6, calib=calib, seed=0).report
    assert 0.3 < rep["flops_kept"] <= 0.6 + 1e-9, rep["flops_kept"]
    after = get_adapter(model).widths()
    assert after != before and rep["params_after"] < rep["params_before"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"]).logits
    assert torch.isfinite(out).all()
    save_pruned(model, tmp_path / "m", info={"report": rep})
    assert read_manifest(tmp_path / "m")["family"] == get_adapter(model).family
    again = load_pruned(tmp_path / "m")
    assert get_adapter(again).widths() == after
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=batch["input_ids"]).logits, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_layer_stream_follows_sliding_and_global_layers(family):
    """Layer by layer with the calibration stream gives the full forward's hidden states
    although sliding-window and global layers get different masks (and rotary tables)."""
    from tshrink.calibration import LayerStream

    model = tiny_model(family)
    assert len(set(model.config.layer_types)) > 1
    adapter = get_adapter(model)
    calib = tiny_batches(family)
    with torch.no_grad():
        full = model(**{k: calib.batches[0][k] for k in ("input_ids", "attention_mask")},
                     output_hidden_states=True).hidden_states
    stream = LayerStream(adapter, calib)
    for layer in range(adapter.num_layers - 1):  # the last entry of hidden_states is after the final norm
        stream.advance()
        torch.testing.assert_close(stream.hidden[0], full[layer + 1], rtol=1e-5, atol=1e-5)


def test_supported_architectures_lists_every_tiny_model(family):
    """What the checkpoint allow-list reads: every class the tests build is listed, with its family."""
    from tshrink.arch.families import supported_architectures

    table = supported_architectures()
    assert not [name for name in table if name.endswith("Config")]
    for head in ("base", "causal-lm" if get_adapter(tiny_model(family)).causal else "sequence-classification"):
        model = tiny_model(family, head=head)
        assert table[type(model).__name__] == get_adapter(model).family
    assert "T5Model" not in table


@pytest.mark.parametrize("family", NEW)
def test_harness_prune_on_a_tiny_model_directory(family, tmp_path):
    """``harness prune`` from the command line on a local directory of each newer family."""
    import json

    from _tokenizers import byte_bpe_tokenizer
    from tshrink.models import load_model
    from tshrink_harness.cli import main

    tokenizer = byte_bpe_tokenizer(["some calibration text for a tiny model " * 20])
    tiny_model(family, head="causal-lm", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "pruned"
    rc = main(["prune", "--method", "magnitude", "--model", str(tmp_path / "tiny"), "--flops", "0.5",
               "--output", str(out), "--calib-samples", "4", "--seq-len", "16"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["flops_kept"] <= 0.5 and report["fvcore_flops_after"] < report["fvcore_flops_before"]
    reloaded, _ = load_model(str(out))
    assert type(reloaded).__name__ == type(tiny_model(family, head="causal-lm")).__name__
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]
