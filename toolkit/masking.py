"""Soft masks over attention units and MLP neurons (for scoring, gradients, correction).

A mask multiplies the input of the output projection (one value per unit, broadcast over
the unit's ``group * head_dim`` columns) and the input of the down projection (one value per
neuron). A 0/1 mask gives exactly the output of the physically pruned model, which the
tests check; a mask with ``requires_grad`` gives the gradients Fisher scoring needs.
"""
from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

import torch

from .arch.base import Adapter


@contextmanager
def soft_masks(
    adapter: Adapter,
    head_masks: list[torch.Tensor | None] | None = None,
    neuron_masks: list[torch.Tensor | None] | None = None,
    query_head_masks: list[torch.Tensor | None] | None = None,
) -> Iterator[None]:
    """Apply per-layer masks while the context is open (``None`` entries: no mask).

    ``head_masks[l]`` has shape ``(units_l,)``, ``neuron_masks[l]`` ``(neurons_l,)``,
    ``query_head_masks[l]`` ``(units_l * group_l,)`` (one value per query head, grouped-query
    attention). The tensors are read at every forward pass, so they may be changed in place
    in between.
    """
    handles = []
    n = adapter.num_layers
    head_masks = head_masks or [None] * n
    neuron_masks = neuron_masks or [None] * n
    query_head_masks = query_head_masks or [None] * n
    if len(head_masks) != n or len(neuron_masks) != n or len(query_head_masks) != n:
        raise ValueError(f"masks for {len(head_masks)}/{len(neuron_masks)}/{len(query_head_masks)} layers, "
                         f"the model has {n}")
    try:
        for layer in range(n):
            qm = query_head_masks[layer]
            if qm is not None:
                parts = adapter.attn(layer)
                if qm.shape != (parts.units * parts.group,):
                    raise ValueError(f"query-head mask of layer {layer}: shape {tuple(qm.shape)}, "
                                     f"expected ({parts.units * parts.group},)")

                def query_hook(module, args, qm=qm, width=parts.head_dim):
                    x = args[0]  # (batch, seq, units*group*head_dim)
                    return (x * qm.to(x.dtype).repeat_interleave(width),) + tuple(args[1:])

                handles.append(parts.o.register_forward_pre_hook(query_hook))
            hm, nm = head_masks[layer], neuron_masks[layer]
            if hm is not None:
                parts = adapter.attn(layer)
                if hm.shape != (parts.units,):
                    raise ValueError(f"head mask of layer {layer}: shape {tuple(hm.shape)}, expected ({parts.units},)")
                width = parts.head_dim * parts.group

                def head_hook(module, args, hm=hm, width=width):
                    x = args[0]  # (batch, seq, units*group*head_dim)
                    scale = hm.to(x.dtype).repeat_interleave(width)
                    return (x * scale,) + tuple(args[1:])

                handles.append(parts.o.register_forward_pre_hook(head_hook))
            if nm is not None:
                parts = adapter.mlp(layer)
                if nm.shape != (parts.neurons,):
                    raise ValueError(f"neuron mask of layer {layer}: shape {tuple(nm.shape)}, expected ({parts.neurons},)")

                def neuron_hook(module, args, nm=nm):
                    x = args[0]  # (batch, seq, neurons)
                    return (x * nm.to(x.dtype),) + tuple(args[1:])

                handles.append(parts.out.register_forward_pre_hook(neuron_hook))
        yield
    finally:
        for h in handles:
            h.remove()
