"""Mask gradients on the model (Kwon et al. 2022, section 4.1): the input of the Fisher score.

Every attention unit (head; KV group under GQA) and MLP neuron gets a mask variable that
multiplies its output (``tshrink.masking.soft_masks``), all set to 1 so the model is the
dense one. For each gradient mini-batch ``b`` the task loss ``model(**batch).loss`` (the
classification / regression loss for encoders, the mean next-token loss for decoders) is
differentiated w.r.t. the masks only, giving ``g_b = dL_b / dm`` at ``m = 1``. The
empirical Fisher diagonal ``sum_b g_b ** 2`` (``fisher_math.fisher_importance``) is a unit's
importance; the per-batch vectors drive the rearrangement (``rearrange.py``).

Gradient granularity (``grad_batch_size``): 0 uses the calibration batches as given;
``n > 0`` regroups the calibration examples, in order, into mini-batches of ``n`` (the
last one may be smaller), whatever the calibration batch size: one gradient row per
mini-batch. The public code takes 2,048 examples in mini-batches of 32 (12 for SQuAD),
i.e. 64 rows; ``n = 1`` gives per-example (per-window) gradients, the exact empirical
Fisher of the paper's formula, at one forward/backward per example (what decoders need:
32 windows in batches of 8 would give a Fisher matrix of rank <= 4). The loss is a mean
over its mini-batch, so Fisher values of different granularities differ in scale
(rankings are what the search uses).

Memory (``micro_batch``, ``chunk_tokens``): each gradient batch is run in micro-batches
of at most ``micro_batch`` examples whose scaled losses sum to the batch's mean loss
(:func:`tshrink.lmloss.micro_batch_losses`), the mask gradients accumulated -- exactly the
batch's gradient, at the peak memory of one micro-batch. For causal LMs the next-token loss
is computed by the output head on ``chunk_tokens`` positions at a time under checkpointing,
so the full (tokens, vocab) logits never exist. Only the masks require gradients.

The model is left as it was: parameters are frozen during the passes (no weight gradients
are computed or stored) and their ``requires_grad`` flags are restored; the mask hooks are
removed on exit.
"""
from __future__ import annotations


import torch
from torch import Tensor

from tshrink.arch.base import Adapter
from tshrink.calibration import CalibrationData, to_device
from tshrink.lmloss import micro_batch_losses
from tshrink.masking import soft_masks
from tshrink.progress import Track, untracked


def _pad_to(x: Tensor, seq: int, value: int) -> Tensor:
    """``x`` (batch, s, ...) right-padded with ``value`` to (batch, seq, ...)."""
    if x.shape[1] == seq:
        return x
    pad = x.new_full((x.shape[0], seq - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], 1)


def _merge(parts: list[Batch]) -> Batch:
    """Concatenate batches along the examples; per-token tensors are right-padded to the
    longest (attention mask 0, per-token labels -100), per-example ones just stacked."""
    if len(parts) == 1:
        return parts[0]
    seq = max(int(p["input_ids"].shape[1]) for p in parts)
    out: Batch = {}
    for key in parts[0]:
        per_token = all(p[key].ndim >= 2 and p[key].shape[:2] == p["input_ids"].shape[:2] for p in parts)
        if per_token:
            fill = -100 if key == "labels" else 0
            out[key] = torch.cat([_pad_to(p[key], seq, fill) for p in parts])
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


def regroup(batches: list[Batch], size: int) -> Iterator[Batch]:
    """The examples of ``batches``, in order, in mini-batches of ``size`` (the last may be
    smaller); ``size`` 0: the batches as given."""
    if size <= 0:
        yield from batches
        return
    pending: list[Batch] = []
    have = 0
    for batch in batches:
        rows = int(batch["input_ids"].shape[0])
        start = 0
        while start < rows:
            take = min(size - have, rows - start)
            pending.append({k: v[start:start + take] for k, v in batch.items()})
            have, start = have + take, start + take
            if have == size:
                yield _merge(pending)
                pending, have = [], 0
    if pending:
        yield _merge(pending)


def collect_mask_grads(
    adapter: Adapter,
    calib: CalibrationData,
    *,
    device: torch.device | str | None = None,
    grad_batch_size: int = 0,
    track: Track = untracked,
    micro_batch: int = 0,
    chunk_tokens: int = 1024,
    query_out: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-batch gradients of the task loss w.r.t. unit masks at 1.

    Returns ``(head_grads, neuron_grads)``: per layer ``l`` a float32 CPU tensor of shape
    ``(batches, units_l)`` / ``(batches, neurons_l)``, one row per gradient mini-batch (see
    the module docstring for ``grad_batch_size``). Every batch must carry ``labels``.
    ``query_out`` (a list, grouped-query attention): a mask per query head is installed too and
    its per-layer ``(batches, units_l * group_l)`` gradients are appended to it.
    """
    if not isinstance(grad_batch_size, int) or grad_batch_size < 0:
        raise ValueError(f"fisher_grad_batch_size must be 'auto' or an integer >= 0 (0 = the calibration "
                         f"batches as given, 1 = per example), got {grad_batch_size!r}")
    if not isinstance(micro_batch, int) or micro_batch < 0:
        raise ValueError(f"fisher_micro_batch must be an integer >= 0 (0 = one forward per gradient batch), "
                         f"got {micro_batch!r}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"fisher_loss_chunk must be an integer >= 1 (tokens per output-head chunk), got {chunk_tokens!r}")
    model = adapter.model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    # masks at 1, one per unit: (units_l,) and (neurons_l,)
    heads = [torch.ones(n, device=dev, requires_grad=True) for n in adapter.head_counts()]
    neurons = [torch.ones(n, device=dev, requires_grad=True) for n in adapter.neuron_counts()]
    queries = ([torch.ones(a.units * a.group, device=dev, requires_grad=True)
                for a in (adapter.attn(layer) for layer in range(adapter.num_layers))]
               if query_out is not None else [])
    masks = heads + neurons + queries
    rows: list[list[Tensor]] = [[] for _ in masks]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with soft_masks(adapter, heads, neurons, queries or None):
            for index, batch in enumerate(calib.batches):
                if "labels" not in batch:
                    raise ValueError(f"calibration batch {index} from {calib.source!r} has no 'labels': "
                                     "Fisher scores need the task loss (class ids, regression targets or "
                                     "next-token ids)")
            for index, chunk in enumerate(track(regroup(calib.batches, grad_batch_size), desc="gradient batches")):
                acc: list[Tensor | None] = [None] * len(masks)
                for loss in micro_batch_losses(model, adapter, to_device(chunk, dev), micro_batch=micro_batch,
                                               chunk_tokens=chunk_tokens):
                    if not torch.isfinite(loss):  # e.g. windows of one token: no next-token target at all
                        raise ValueError(f"the task loss of gradient mini-batch {index} from {calib.source!r} is "
                                         f"{loss.item()}: no usable targets (a causal LM needs windows of at least "
                                         f"2 tokens); Fisher scores need a finite loss")
                    grads = torch.autograd.grad(loss, masks, allow_unused=True)
                    del loss
                    acc = [a if g is None else (g.detach() if a is None else a + g.detach())
                           for a, g in zip(acc, grads)]
                for row, g, m in zip(rows, acc, masks):
                    row.append((torch.zeros_like(m) if g is None else g).float().cpu())
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    stacked = [torch.stack(r) for r in rows]  # each (batches, units_l)
    if query_out is not None:
        query_out.extend(stacked[len(heads) + len(neurons):])
    return stacked[: len(heads)], stacked[len(heads): len(heads) + len(neurons)]
