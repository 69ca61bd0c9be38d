"""Physical removal of attention units and MLP neurons, and biases added to output projections.

transformers 5 has no ``prune_heads``; this module does the surgery itself: it slices the
Linear weights (rows of Q/K/V and up/gate, columns of the output projection and down) and
replaces an attention block that loses every unit by an :class:`EmptyAttention`.

Correction stages may add a bias to a layer's attention output projection or MLP down
projection even where the architecture has none (Llama): :func:`add_output_bias`. The
checkpoint records which of them carry a bias (:func:`output_bias_flags`) and
:func:`restore_output_biases` gives a freshly built model the same bias slots before its
weights are read.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .arch.base import Adapter
from .units import Selection


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``index`` along ``dim`` (0: output rows, 1: input columns)."""
    w = linear.weight  # (out, in)
    index = index.to(w.device)
    weight = w.index_select(dim, index).detach().clone()
    bias = None
    if linear.bias is not None:
        bias = (linear.bias.index_select(0, index) if dim == 0 else linear.bias).detach().clone()
    with warnings.catch_warnings():  # zero-width layers are legal here
        warnings.simplefilter("ignore", UserWarning)
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=w.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return out


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise RuntimeError("module to replace not found")  # adapter and model disagree


def prune_heads(adapter: Adapter, layer: int, keep: list[int]) -> None:
    """Keep only attention units ``keep`` (indices into the layer's current units)."""
    parts = adapter.attn(layer)
    keep = sorted(set(int(i) for i in keep))
    if keep == list(range(parts.units)):
        return
    block = adapter.layers()[layer]
    d, g = parts.head_dim, parts.group
    units = torch.as_tensor(keep, dtype=torch.long).reshape(-1, 1)
    q_idx = (units * g * d + torch.arange(g * d)).flatten()  # query heads of kept units
    kv_idx = (units * d + torch.arange(d)).flatten()  # their key/value head
    _replace(block, parts.o, _slice_linear(parts.o, q_idx, dim=1))
    if not keep:
        adapter.empty_attention(layer)
        return
    _replace(block, parts.q, _slice_linear(parts.q, q_idx, dim=0))
    _replace(block, parts.k, _slice_linear(parts.k, kv_idx if g > 1 else q_idx, dim=0))
    _replace(block, parts.v, _slice_linear(parts.v, kv_idx if g > 1 else q_idx, dim=0))
    adapter.update_attn_attrs(layer, len(keep))


def prune_neurons(adapter: Adapter, layer: int, keep: list[int]) -> None:
    """Keep only MLP neurons ``keep`` (gate/up rows and down columns together)."""
    parts = adapter.mlp(layer)
    keep = sorted(set(int(i) for i in keep))
    if keep == list(range(parts.neurons)):
        return
    block = adapter.layers()[layer]
    index = torch.as_tensor(keep, dtype=torch.long)
    for linear in parts.inputs:
        _replace(block, linear, _slice_linear(linear, index, dim=0))
    _replace(block, parts.out, _slice_linear(parts.out, index, dim=1))


def apply_selection(adapter: Adapter, selection: Selection) -> None:
    """Physically remove every unit outside ``selection`` (in place)."""
    selection.check(adapter.head_counts(), adapter.neuron_counts())
    for layer in range(adapter.num_layers):
        prune_heads(adapter, layer, selection.heads[layer])
        prune_neurons(adapter, layer, selection.neurons[layer])


def shrink_to_widths(adapter: Adapter, widths: dict[str, list[int]]) -> None:
    """Give every layer the recorded widths (keeping the first units); used when loading a
    pruned checkpoint into a freshly built full-size model before its weights are read."""
    sel = Selection([list(range(n)) for n in widths["heads"]], [list(range(n)) for n in widths["neurons"]])
    apply_selection(adapter, sel)


def add_output_bias(adapter: Adapter, layer: int, kind: str, delta: torch.Tensor) -> None:
    """Add ``delta`` (hidden,) to the bias of layer ``layer``'s attention output projection
    (``kind="attn"``) or MLP down projection (``kind="mlp"``), creating the bias if the
    Linear has none."""
    linear = _output_linear(adapter, layer, kind)
    delta = delta.detach().reshape(-1)
    if delta.shape != (linear.out_features,):
        raise ValueError(f"bias for layer {layer} {kind}: shape {tuple(delta.shape)}, expected ({linear.out_features},)")
    with torch.no_grad():
        if linear.bias is None:
            linear.bias = nn.Parameter(delta.to(linear.weight).clone(), requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.add_(delta.to(linear.bias))


def output_bias_flags(adapter: Adapter) -> dict[str, list[bool]]:
    """Per layer, whether the attention output projection / MLP down projection has a bias."""
    return {kind: [_output_linear(adapter, layer, kind).bias is not None for layer in range(adapter.num_layers)]
            for kind in ("attn", "mlp")}


def restore_output_biases(adapter: Adapter, flags: dict[str, list[bool]] | None) -> None:
    """Give every output projection that ``flags`` marks a (zero) bias slot it lacks, so a
    checkpoint whose correction added biases loads into a freshly built model."""
    for kind, per_layer in (flags or {}).items():
        if len(per_layer) != adapter.num_layers:
            raise ValueError(f"output-bias flags for {len(per_layer)} layers, the model has {adapter.num_layers}")
        for layer, flag in enumerate(per_layer):
            linear = _output_linear(adapter, layer, kind)
            if flag and linear.bias is None:
                add_output_bias(adapter, layer, kind, torch.zeros(linear.out_features))


def _output_linear(adapter: Adapter, layer: int, kind: str) -> nn.Linear:
    if kind == "attn":
        return adapter.attn(layer).o
    if kind == "mlp":
        return adapter.mlp(layer).out
    raise ValueError(f"kind {kind!r} is not 'attn' or 'mlp'")
