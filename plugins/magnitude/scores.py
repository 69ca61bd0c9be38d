"""Magnitude importance (pure math over weights, no pluggy).

Structured: a unit's score is the norm of all weights that belong to it — for an attention
unit its rows of Q, K, V and its columns of the output projection; for a neuron its
up/gate rows and its down column. Unstructured: the absolute value of each weight.
"""
from __future__ import annotations

import torch

from tshrink.arch.base import Adapter

NORMS = ("l1", "l2")


def _norm(blocks: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Per-unit norm over blocks shaped (units, ...)."""
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r} is not one of {NORMS}")
    flat = torch.cat([b.detach().float().reshape(b.shape[0], -1) for b in blocks], dim=1)  # (units, weights)
    return flat.abs().sum(1) if norm == "l1" else flat.pow(2).sum(1).sqrt()


def head_scores(adapter: Adapter, layer: int, norm: str = "l2") -> torch.Tensor:
    """(units,) norms of each attention unit's weights in layer ``layer``."""
    p = adapter.attn(layer)
    if p.units == 0:
        return torch.zeros(0)
    u, d, g = p.units, p.head_dim, p.group
    blocks = [
        p.q.weight.reshape(u, g * d, -1),  # (units, g*d, hidden)
        p.k.weight.reshape(u, d, -1),
        p.v.weight.reshape(u, d, -1),
        p.o.weight.t().reshape(u, g * d, -1),  # columns of O, grouped per unit
    ]
    return _norm(blocks, norm)


def query_head_scores(adapter: Adapter, layer: int, norm: str = "l2") -> torch.Tensor:
    """(units*group,) norms of each query head's Q rows and output-projection columns (its
    KV group's K/V rows are shared, so they do not tell its query heads apart)."""
    p = adapter.attn(layer)
    if p.units == 0:
        return torch.zeros(0)
    n, d = p.units * p.group, p.head_dim
    return _norm([p.q.weight.reshape(n, d, -1), p.o.weight.t().reshape(n, d, -1)], norm)


def neuron_scores(adapter: Adapter, layer: int, norm: str = "l2") -> torch.Tensor:
    """(neurons,) norms of each neuron's up/gate rows and down column."""
    p = adapter.mlp(layer)
    blocks = [lin.weight for lin in p.inputs] + [p.out.weight.t()]  # each (neurons, hidden)
    return _norm(blocks, norm)


def prunable_linears(adapter: Adapter) -> list[tuple[str, torch.nn.Linear]]:
    """Every Linear of the transformer layers (attention and MLP), with a readable name."""
    out = []
    for layer in range(adapter.num_layers):
        a, m = adapter.attn(layer), adapter.mlp(layer)
        for name, lin in (("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o)):
            if lin is not None and lin.weight.numel():
                out.append((f"layers.{layer}.attn.{name}", lin))
        for i, lin in enumerate(m.inputs + [m.out]):
            if lin.weight.numel():
                out.append((f"layers.{layer}.mlp.{i}", lin))
    return out


def unstructured_prune(adapter: Adapter, sparsity: float) -> dict[str, float]:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of all layer Linears
    (one global threshold; ties broken by position). Returns achieved figures."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity!r} is outside [0, 1)")
    linears = prunable_linears(adapter)
    views = sorted({name for name, lin in linears if getattr(lin, "read_only", False) or hasattr(lin, "write_columns")})
    if views:
        raise ValueError(f"unstructured magnitude pruning of mixture-of-experts weights ({views[0]}, ...) is not "
                         "implemented")
    mags = torch.cat([lin.weight.detach().abs().flatten().float().cpu() for _, lin in linears])
    n_prune = int(round(sparsity * mags.numel()))
    mask = torch.ones(mags.numel(), dtype=torch.bool)
    if n_prune:
        order = torch.sort(mags, stable=True).indices
        mask[order[:n_prune]] = False
    offset = 0
    with torch.no_grad():
        for _, lin in linears:
            n = lin.weight.numel()
            lin.weight.mul_(mask[offset:offset + n].reshape(lin.weight.shape).to(lin.weight))
            offset += n
    return {"sparsity": 1 - mask.float().mean().item(), "weights": mags.numel(), "zeros": n_prune}
