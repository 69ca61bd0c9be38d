"""Task losses whose memory does not grow with the batch: chunked next-token loss and
micro-batched gradient accumulation.

A causal LM's full logits are (batch, seq, vocab) in float32: 8 x 1024 tokens x 49k vocab is
1.6 GB, and their gradient as much again. :func:`chunked_lm_loss_sum` runs the output head
on ``chunk_tokens`` positions at a time under activation checkpointing, so only one chunk's
logits exist at once, in the forward and in the backward pass (the backward recomputes a
chunk's logits from the saved hidden states, (tokens, hidden)).

:func:`micro_batch_loss_sums` splits a gradient batch into micro-batches of
``micro_batch`` examples and yields, per micro-batch, a loss already scaled so that the
micro-batch losses SUM to the gradient batch's mean loss: backward on each and the
accumulated gradient is exactly the whole batch's (peak memory: one micro-batch).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Batch = dict[str, torch.Tensor]
IGNORE = -100


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (chunk, vocab)
    return nn.functional.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")


def chunked_lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                        chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies, number of predicted tokens) for last hidden
    states ``hidden`` (batch, seq, hidden) and ``labels`` (batch, seq) (-100 = ignored;
    position t predicts label t+1, as Hugging Face's causal-LM loss)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (batch*(seq-1), hidden)
    y = labels[:, 1:].reshape(-1).to(hidden.device)  # (batch*(seq-1),)
    keep = y != IGNORE
    h, y = h[keep], y[keep]  # (tokens, hidden), (tokens,)
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and h.requires_grad
    for start in range(0, y.numel(), chunk_tokens):
        hc, yc = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
        total = total + (checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False) if grad
                         else _chunk_ce(head, hc, yc))
    return total, int(y.numel())


def supports_chunked_lm_loss(model: nn.Module, adapter: Any) -> bool:
    """Whether the next-token loss can be computed as ``head(backbone(x))``: a causal LM of a
    supported family whose logits are the output embedding of the last hidden state (no
    logit scaling or soft-capping)."""
    cfg = getattr(model, "config", None)
    if adapter is None or not adapter.causal or model.get_output_embeddings() is None:
        return False
    return not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def _rows(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def split_batch(batch: Batch, size: int) -> Iterator[Batch]:
    """``batch`` split along its first dimension into pieces of at most ``size`` rows (0: whole)."""
    rows = _rows(batch)
    if size <= 0 or size >= rows:
        yield batch
        return
    for start in range(0, rows, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


def micro_batch_losses(model: nn.Module, adapter: Any, batch: Batch, *, micro_batch: int = 0,
                       chunk_tokens: int = 1024) -> Iterator[torch.Tensor]:
    """Scaled losses of ``batch``'s micro-batches; their sum is the batch's mean task loss
    (next-token loss over all predicted tokens of the batch for causal LMs, computed chunked;
    the model's own loss, a mean over examples, for task heads). ``batch`` on the model's device."""
    from .calibration import model_inputs

    if supports_chunked_lm_loss(model, adapter):
        labels = batch["labels"]
        count = int((labels[:, 1:] != IGNORE).sum())
        if count == 0:
            raise ValueError("a calibration batch has no next-token label (all -100)")
        backbone, head = adapter.backbone(), model.get_output_embeddings()
        for part in split_batch(batch, micro_batch):
            inputs = model_inputs(part)
            inputs["use_cache"] = False
            hidden = backbone(**inputs).last_hidden_state  # (micro, seq, hidden)
            loss_sum, _ = chunked_lm_loss_sum(hidden, part["labels"], head, chunk_tokens)
            yield loss_sum / count
        return
    rows = _rows(batch)
    for part in split_batch(batch, micro_batch):
        out = model(**model_inputs(part, labels=True))
        loss = getattr(out, "loss", None)
        if loss is None:
            raise ValueError(f"{type(model).__name__} returned no loss; give a model with a task head "
                             "(classification, LM)")
        yield loss * (_rows(part) / rows)  # the model's loss is a mean over the micro-batch's examples
