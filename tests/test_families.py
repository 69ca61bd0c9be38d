"""The families added after the first four, through every structured method end to end.

The per-family contract of the toolkit's parts (masked == pruned, cost vs fvcore, save /
reload) runs over all families in test_surgery.py / test_cost.py; here each newer family
goes once through ``tshrink.prune`` with each structured method (scores, selection,
correction on its real layout) and is saved and reloaded.
"""
from __future__ import annotations

import pytest
import torch

from conftest import GENERIC, tiny_batches, tiny_model
from tshrink.testing import MOE
from tshrink.arch.families import get_adapter
from tshrink.checkpoint import load_pruned, read_manifest, save_pruned
from tshrink.pipeline import prune

NEW = ("qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "modernbert", "deberta-v2") + GENERIC + MOE
ENCODERS = ("modernbert", "deberta-v2")


def _head(family: str) -> str:
    return "sequence-classification" if family in ENCODERS else "causal-lm"


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
STRUCTURED = ("magnitude", "stat", "fisher")


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("family", NEW)
def test_structured_method_on_family(family, method, tmp_path):
    model = tiny_model(family, head=_head(family))
    calib = tiny_batches(family, labels="class" if family in ENCODERS else "lm")
    batch = calib.batches[0]
    before = get_adapter(model).widths()
    rep = prune(model, method, 0.6, calib=calib, seed=0).report
    if method == "fisher":  # generic and sandwich-norm layouts tune towards projection outputs only
        plain = family in GENERIC or family.startswith("gemma")
        assert rep["stages"]["fisher-tune"]["targets"] == ("projection outputs" if plain
                                                           else "projection outputs + residual")
    assert 0.3 < rep["flops_kept"] <= 0.6 + 1e-9, rep["flops_kept"]
    after = get_adapter(model).widths()
    assert after != before and rep["params_after"] < rep["params_before"]
    out = _logits(model, batch)
    assert torch.isfinite(out).all()
    save_pruned(model, tmp_path / "m", info={"report": rep})
    assert read_manifest(tmp_path / "m")["family"] == get_adapter(model).family
    again = load_pruned(tmp_path / "m")
    assert get_adapter(again).widths() == after
    torch.testing.assert_close(_logits(again, batch), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "modernbert"])
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
    if family in GENERIC:  # no reviewed adapter: not on the list
        assert type(tiny_model(family)).__name__ not in table
        return
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

    text = "some calibration text for a tiny model " * 20
    if family in ENCODERS:
        from _tokenizers import wordpiece_tokenizer

        tokenizer = wordpiece_tokenizer([text], tmp_path)
    else:
        tokenizer = byte_bpe_tokenizer([text])
    head = "base" if family in ENCODERS else "causal-lm"
    tiny_model(family, head=head, vocab_size=max(97, len(tokenizer))).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "pruned"
    rc = main(["prune", "--method", "magnitude", "--model", str(tmp_path / "tiny"), "--flops", "0.5",
               "--output", str(out), "--calib-samples", "4", "--seq-len", "16"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["flops_kept"] <= 0.5 and report["fvcore_flops_after"] < report["fvcore_flops_before"]
    reloaded, _ = load_model(str(out))
    assert type(reloaded).__name__ == type(tiny_model(family, head=head)).__name__
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]


def test_generic_adapter_warns_once_and_refuses_a_layout_it_cannot_prune():
    import transformers as tf

    model = tiny_model("granite")
    with pytest.warns(UserWarning, match="'granite' has no reviewed tshrink adapter.*generic decoder adapter"):
        assert get_adapter(model).family == "generic"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_adapter(model)  # checked and announced once per model
    # OLMo-2 normalises q and k over all heads together: removing a head changes that norm
    olmo2 = tf.Olmo2Model(tf.Olmo2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, vocab_size=97,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match="unsupported architecture 'olmo2'.*masked-vs-pruned check"):
        get_adapter(olmo2)


def test_known_unsupported_families_say_why(monkeypatch):
    import transformers as tf

    from tshrink.arch import catalog
    from tshrink.arch.families import unsupported_reasons

    assert "gemma3" in unsupported_reasons() and "mixtral" not in unsupported_reasons()
    monkeypatch.setitem(catalog.UNSUPPORTED, "olmo2", "a reason given by the catalog")
    olmo2 = tf.Olmo2Model(tf.Olmo2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, vocab_size=97,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match="unsupported architecture 'olmo2'.*a reason given by the catalog"):
        get_adapter(olmo2)


@pytest.mark.parametrize("types", [["c2p"], ["p2c", "c2p"]])
def test_deberta_separate_position_projections(types):
    """DeBERTa-v2 without shared position keys: ``pos_key_proj`` / ``pos_query_proj`` lose
    the rows of removed heads; masked == pruned and the cost model still match fvcore."""
    import transformers as tf

    from test_surgery import _random_selection
    from tshrink.cost import CostModel
    from tshrink.flops import measure_flops
    from tshrink.masking import soft_masks
    from tshrink.surgery import apply_selection

    torch.manual_seed(0)
    model = tf.DebertaV2Model(tf.DebertaV2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, vocab_size=97,
        max_position_embeddings=64, relative_attention=True, max_relative_positions=6, position_buckets=-1,
        pos_att_type=types, share_att_key=False, pad_token_id=0)).eval()
    adapter = get_adapter(model)
    assert adapter.extra_head_projs(0)
    batch = tiny_batches("deberta-v2").batches[0]
    sel = _random_selection(adapter, seed=4)
    hm, nm = sel.masks(adapter.head_counts(), adapter.neuron_counts())
    with soft_masks(adapter, hm, nm), torch.no_grad():
        masked = model(**{k: batch[k] for k in ("input_ids", "attention_mask")})[0]
    cost = CostModel(adapter, 16)
    apply_selection(adapter, sel)
    with torch.no_grad():
        pruned = model(**{k: batch[k] for k in ("input_ids", "attention_mask")})[0]
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    measured = measure_flops(model, 16)["total"]
    assert abs(cost.backbone_macs(adapter.widths()) - measured) <= 0.01 * measured


def test_catalog_matches_the_adapters_and_imports_no_torch():
    """``harness plugins`` can show the architecture table without importing torch."""
    import subprocess
    import sys

    from tshrink.arch.catalog import FAMILIES, architecture_rows
    from tshrink.arch.families import ADAPTERS

    assert {cls.family: tuple(cls.model_types) for cls in ADAPTERS} == {f: t for f, (t, _) in FAMILIES.items()}
    assert any("mixtral" in r["model types"] and r["structured pruning"] == "yes" and "top-k experts" in r["notes"]
               for r in architecture_rows())
    assert any(r["model types"] == "gemma3" and r["structured pruning"] == "no" for r in architecture_rows())
    code = ("import sys\nfrom tshrink.arch.catalog import architecture_rows\narchitecture_rows()\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("arch", ["known", "olmo2"])
def test_harness_prune_refuses_with_the_reason_before_loading(arch, tmp_path, capsys, monkeypatch):
    """A refused family is one clear line from ``harness prune``: known refusals from the config
    before loading; the generic adapter's numerical check once the model is loaded, before
    calibration and scoring."""
    import transformers as tf

    from _harness_fixtures import run_cli
    from _tokenizers import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer(["some calibration text for a tiny model " * 20])
    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0, eos_token_id=0)
    if arch == "known":  # a model type the catalog refuses (as it refuses Gemma 3 with its vision tower)
        from tshrink.arch import catalog

        monkeypatch.setitem(catalog.UNSUPPORTED, "olmo2", "its q/k norms span all heads (catalog reason)")
    cfg = tf.Olmo2Config(**common)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rc, err = run_cli(["prune", "--method", "magnitude", "--model", str(tmp_path / "tiny"), "--flops", "0.5",
                       "--output", str(tmp_path / "out"), "--calib-samples", "4", "--seq-len", "16"], capsys)
    assert rc == 2, err
    if arch == "known":
        assert "(olmo2) has none" in err and "catalog reason" in err and "Loading weights" not in err, err
    else:
        assert "unsupported architecture 'olmo2'" in err and "masked-vs-pruned check" in err, err
    assert not (tmp_path / "out").exists()
