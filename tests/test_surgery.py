"""Physical removal against soft masking, and save -> reload, for every family."""
from __future__ import annotations

import torch

from conftest import DECODERS, tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.checkpoint import load_pruned, save_pruned
from tshrink.masking import soft_masks
from tshrink.surgery import apply_selection
from tshrink.units import Selection


def _random_selection(adapter, seed: int = 0) -> Selection:
    """Non-uniform widths; layer 1 loses every head, layer 2 every neuron (mixture-of-experts
    layers: a random count kept in every expert, each expert its own random neurons)."""
    g = torch.Generator().manual_seed(seed)
    heads, neurons = [], []
    for layer, (h, n) in enumerate(zip(adapter.head_counts(), adapter.neuron_counts())):
        E = adapter.experts(layer) or 1
        kh = 0 if layer == 1 else int(torch.randint(1, h + 1, (1,), generator=g))
        kn = 0 if layer == 2 else int(torch.randint(1, n // E, (1,), generator=g))
        heads.append(torch.randperm(h, generator=g)[:kh].tolist())
        per = n // E
        neurons.append([e * per + i for e in range(E) for i in torch.randperm(per, generator=g)[:kn].tolist()])
    return Selection(heads, neurons)


def _forward(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]


def test_masked_equals_pruned(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    batch = tiny_batches(family).batches[0]
    sel = _random_selection(adapter)
    hm, nm = sel.masks(adapter.head_counts(), adapter.neuron_counts())
    with soft_masks(adapter, hm, nm):
        masked = _forward(model, batch)
    dense = _forward(model, batch)
    apply_selection(adapter, sel)
    pruned = _forward(model, batch)
    assert adapter.widths() == sel.widths()
    assert not torch.allclose(dense, masked, atol=1e-3)  # the masks did something
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)


def test_parameter_count_shrinks_as_expected(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    before = sum(p.numel() for p in model.parameters())
    sel = _random_selection(adapter, seed=1)
    expected_removed = 0
    for layer in range(adapter.num_layers):
        a, m = adapter.attn(layer), adapter.mlp(layer)
        dropped = a.units - len(sel.heads[layer])
        per_unit = sum(lin.weight.shape[0] // a.units * (lin.weight.shape[1] + (lin.bias is not None))
                       for lin in (a.q, a.k, a.v)) + a.o.weight.shape[0] * a.head_dim * a.group
        expected_removed += dropped * per_unit
        if not sel.heads[layer]:  # per-head q/k norms (Qwen3, Gemma 3) go with the attention block
            expected_removed += sum(p.numel() for n, p in adapter.layers()[layer].named_parameters()
                                    if n.rsplit(".", 2)[-2] in ("q_norm", "k_norm"))
        per_neuron = sum(lin.weight.shape[1] + (lin.bias is not None) for lin in m.inputs) + m.out.weight.shape[0]
        expected_removed += (m.neurons - len(sel.neurons[layer])) * per_neuron
    apply_selection(adapter, sel)
    assert sum(p.numel() for p in model.parameters()) == before - expected_removed


def test_save_reload_identical(family, tmp_path):
    model = tiny_model(family, head="causal-lm" if family in DECODERS else "sequence-classification")
    adapter = get_adapter(model)
    apply_selection(adapter, _random_selection(adapter, seed=2))
    batch = tiny_batches(family).batches[0]
    out = save_pruned(model, tmp_path / "ckpt")
    assert (out / "model.safetensors").exists() and (out / "tshrink.json").exists()
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".*tmp"))  # safetensors only, no leftovers
    reloaded = load_pruned(out)
    assert get_adapter(reloaded).widths() == adapter.widths()
    torch.testing.assert_close(_forward(reloaded, batch), _forward(model, batch), rtol=0, atol=0)


def test_unsupported_architecture_names_supported_ones():
    import transformers as tf
    import pytest

    model = tf.T5Model(tf.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 't5'.*bert.*gpt2.*llama"):
        get_adapter(model)
