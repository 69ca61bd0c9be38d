"""Bounded-memory losses: the chunked next-token loss and micro-batch accumulation equal the
plain full-batch loss and its mask gradients."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.calibration import model_inputs
from tshrink.lmloss import chunked_lm_loss_sum, micro_batch_losses
from tshrink.masking import soft_masks
from tshrink_plugins.fisher.collect import collect_mask_grads

CAUSAL = ("llama", "mistral", "qwen2", "opt")


def _batch(family: str, labels: str = "lm"):
    b = tiny_batches(family, n_batches=1, batch=5, seq=10, labels=labels).batches[0]
    if labels == "lm":
        b["labels"][1, :3] = -100  # some ignored positions
    return b


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("family", CAUSAL)
def test_chunked_lm_loss_and_grads_equal_full_loss(family, chunk):
    model = tiny_model(family, "causal-lm")
    adapter = get_adapter(model)
    batch = _batch(family)
    masks = [torch.ones(n, requires_grad=True) for n in adapter.head_counts() + adapter.neuron_counts()]
    hm, nm = masks[: adapter.num_layers], masks[adapter.num_layers:]
    with soft_masks(adapter, hm, nm):
        full = model(**model_inputs(batch, labels=True)).loss
        g_full = torch.autograd.grad(full, masks)
        hidden = adapter.backbone()(**model_inputs(batch)).last_hidden_state
        total, count = chunked_lm_loss_sum(hidden, batch["labels"], model.get_output_embeddings(), chunk)
        g_chunk = torch.autograd.grad(total / count, masks)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family,head,labels", [("llama", "causal-lm", "lm"), ("opt", "causal-lm", "lm"),
                                                ("bert", "sequence-classification", "class")])
def test_micro_batches_sum_to_the_batch_loss(family, head, labels):
    model = tiny_model(family, head)
    adapter = get_adapter(model)
    batch = _batch(family, labels)
    with torch.no_grad():
        full = model(**model_inputs(batch, labels=True)).loss
        for micro in (1, 2, 0):
            parts = list(micro_batch_losses(model, adapter, batch, micro_batch=micro, chunk_tokens=4))
            assert len(parts) == (5 if micro == 1 else 3 if micro == 2 else 1)
            torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,head,labels", [("llama", "causal-lm", "lm"), ("bert", "sequence-classification", "class")])
def test_mask_grads_do_not_depend_on_micro_batch(family, head, labels):
    model = tiny_model(family, head)
    adapter = get_adapter(model)
    calib = tiny_batches(family, n_batches=2, batch=4, labels=labels)
    ref = collect_mask_grads(adapter, calib, micro_batch=0)
    for micro, chunk in ((1, 3), (3, 1024)):
        got = collect_mask_grads(adapter, calib, micro_batch=micro, chunk_tokens=chunk)
        for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_bad_micro_batch_is_one_clear_error():
    model = tiny_model("llama", "causal-lm")
    with pytest.raises(ValueError, match="fisher_micro_batch"):
        collect_mask_grads(get_adapter(model), tiny_batches("llama", labels="lm"), micro_batch=-1)
