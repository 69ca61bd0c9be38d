"""Physical removal of attention units and MLP neurons, and biases added to output projections.

transformers 5 has no ``prune_heads``; this module does the surgery itself: it slices the
Linear weights (rows of Q/K/V and up/gate, columns of the output projection and down) and
replaces an attention block that loses every unit by an :class:`EmptyAttention`.

Fused projections (Phi-3's ``qkv_proj`` / ``gate_up_proj``, GPT-NeoX's interleaved
``query_key_value``, GPT-2's ``c_attn``) come from the adapter as :class:`Proj` views on
one module: the kept rows of all views of a module are gathered and the module is sliced
once, so its layout (blocks, interleaving) is kept. GPT-2's ``Conv1D`` (weights stored
``(in, out)``) is sliced along the matching axes.

Correction stages may add a bias to a layer's attention output projection or MLP down
projection even where the architecture has none (Llama): :func:`add_output_bias`. The
checkpoint records which of them carry a bias (:func:`output_bias_flags`) and
:func:`restore_output_biases` gives a freshly built model the same bias slots before its
weights are read.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from .arch.base import Adapter, Proj, module_of, row_index
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


@functools.cache
def _conv1d_class() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    class PrunedConv1D(Conv1D):
        """GPT-2's Conv1D that also runs with zero input or output features."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            size_out = x.size()[:-1] + (self.nf,)
            x = torch.addmm(self.bias, x.reshape(size_out[:-1].numel(), self.nx), self.weight)  # (tokens, nf)
            return x.view(size_out)

    return PrunedConv1D


def _slice_module(module: nn.Module, index: torch.Tensor, dim: int) -> nn.Module:
    """``module`` keeping ``index`` along ``dim`` in Linear orientation (0: outputs, 1: inputs)."""
    if isinstance(module, nn.Linear):
        return _slice_linear(module, index, dim)
    # GPT-2 Conv1D: weight (in, out), bias (out,)
    w = module.weight
    index = index.to(w.device)
    weight = w.index_select(1 - dim, index).detach().clone()
    bias = module.bias.index_select(0, index) if dim == 0 else module.bias
    out = _conv1d_class()(weight.shape[1], weight.shape[0])
    out.weight = nn.Parameter(weight, requires_grad=w.requires_grad)
    out.bias = nn.Parameter(bias.detach().clone(), requires_grad=module.bias.requires_grad)
    return out.to(w.device)


def _keep(block: nn.Module, plan: list[tuple[nn.Module | Proj, torch.Tensor]], dim: int) -> None:
    """Slice every module behind the projections of ``plan`` (projection, kept indices) once."""
    groups: dict[int, tuple[nn.Module, list[torch.Tensor]]] = {}
    for proj, index in plan:
        module = module_of(proj)
        idx = row_index(proj, index) if dim == 0 else index
        groups.setdefault(id(module), (module, []))[1].append(idx)
    for module, parts in groups.values():
        index = torch.cat(parts).sort().values  # the module's own order (blocks, interleaving)
        w = module.weight
        size = w.shape[0] if isinstance(module, nn.Linear) == (dim == 0) else w.shape[1]
        if index.numel() == size and bool((index.cpu() == torch.arange(size)).all()):
            continue  # every row / column kept: leave the module as it is
        _replace(block, module, _slice_module(module, index, dim))


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
    _keep(block, [(parts.o, q_idx)], dim=1)
    if not keep:
        adapter.empty_attention(layer)
        return
    kv = kv_idx if g > 1 else q_idx
    extra = [(proj, q_idx) for proj in adapter.extra_head_projs(layer)]
    _keep(block, [(parts.q, q_idx), (parts.k, kv), (parts.v, kv)] + extra, dim=0)
    adapter.update_attn_attrs(layer, len(keep))


def prune_query_heads(adapter: Adapter, layer: int, keep: list[int]) -> None:
    """Keep only query heads ``keep`` (indices ``unit * group + j``) under grouped-query
    attention; every unit must keep the same number ``g'`` of its ``group`` query heads, so
    the layer stays a GQA layer, with groups of ``g'`` (K and V are not touched)."""
    parts = adapter.attn(layer)
    d, g, units = parts.head_dim, parts.group, parts.units
    keep = sorted(set(int(i) for i in keep))
    if keep == list(range(units * g)):
        return
    if g == 1:
        raise ValueError(f"layer {layer}: query-head units need grouped-query attention (one query head per KV head "
                         "here); remove whole heads instead")
    Selection([list(range(units))], [[]], [keep]).group_sizes([g])  # same g' >= 1 in every unit
    heads = torch.as_tensor(keep, dtype=torch.long).reshape(-1, 1)
    q_idx = (heads * d + torch.arange(d)).flatten()  # (units*g'*d,) rows of Q, columns of O
    kv_idx = torch.arange(units * d)
    block = adapter.layers()[layer]
    _keep(block, [(parts.o, q_idx)], dim=1)
    _keep(block, [(parts.q, q_idx), (parts.k, kv_idx), (parts.v, kv_idx)], dim=0)
    adapter.update_attn_attrs(layer, units)


def prune_neurons(adapter: Adapter, layer: int, keep: list[int]) -> None:
    """Keep only MLP neurons ``keep`` (gate/up rows and down columns together)."""
    parts = adapter.mlp(layer)
    keep = sorted(set(int(i) for i in keep))
    if keep == list(range(parts.neurons)):
        return
    if adapter.experts(layer) is not None:  # mixture-of-experts: fused 3-D expert tensors
        adapter.prune_mlp(layer, keep)  # type: ignore[attr-defined]
        return
    block = adapter.layers()[layer]
    index = torch.as_tensor(keep, dtype=torch.long)
    _keep(block, [(linear, index) for linear in parts.inputs], dim=0)
    _keep(block, [(parts.out, index)], dim=1)
    adapter.update_mlp_attrs(layer, len(keep))


def apply_selection(adapter: Adapter, selection: Selection) -> None:
    """Physically remove every unit outside ``selection`` (in place): whole units, then the
    query heads that ``selection.query_heads`` drops inside the kept ones."""
    selection.check(adapter.head_counts(), adapter.neuron_counts())
    check_experts(adapter, selection)  # validate before anything is removed
    groups = adapter.group_sizes()
    if selection.query_heads is not None:
        selection.group_sizes(groups)  # validate before anything is removed
    for layer in range(adapter.num_layers):
        prune_heads(adapter, layer, selection.heads[layer])
        q = selection.query_heads[layer] if selection.query_heads is not None else None
        if q is not None and selection.heads[layer]:
            g = groups[layer]
            new_unit = {u: i for i, u in enumerate(selection.heads[layer])}  # after removing units
            prune_query_heads(adapter, layer, [new_unit[h // g] * g + h % g for h in q])
        prune_neurons(adapter, layer, selection.neurons[layer])


def shrink_to_widths(adapter: Adapter, widths: dict[str, list[int]]) -> None:
    """Give every layer the recorded widths (keeping the first units, and with ``"group"``
    the first query heads of each unit); used when loading a pruned checkpoint into a
    freshly built full-size model before its weights are read."""
    heads = [list(range(n)) for n in widths["heads"]]
    query = None
    if "group" in widths:
        dense = adapter.group_sizes()
        query = [[u * g0 + j for u in h for j in range(g)] for h, g, g0 in zip(heads, widths["group"], dense)]
    neurons = [adapter.first_neurons(layer, n) for layer, n in enumerate(widths["neurons"])]
    apply_selection(adapter, Selection(heads, neurons, query))


def check_experts(adapter: Adapter, selection: Selection) -> None:
    """ValueError unless every mixture-of-experts layer keeps the same number of neurons in
    each of its experts."""
    from .arch.moe import check_expert_counts

    for layer in range(adapter.num_layers):
        E = adapter.experts(layer)
        if E is not None:
            check_expert_counts(selection.neurons[layer], E, adapter.mlp(layer).neurons // E, layer)


def write_columns(proj, cols: torch.Tensor, values: torch.Tensor) -> None:
    """Set columns ``cols`` of ``proj``'s weight (Linear orientation) to ``values`` (out, |cols|),
    in the model's own storage (mixture-of-experts down projections are virtual views)."""
    if hasattr(proj, "write_columns"):
        proj.write_columns(cols, values)
        return
    W = proj.weight
    with torch.no_grad():
        W[:, cols.to(W.device)] = values.to(W.device, W.dtype)


def add_output_bias(adapter: Adapter, layer: int, kind: str, delta: torch.Tensor) -> None:
    """Add ``delta`` (hidden,) to the bias of layer ``layer``'s attention output projection
    (``kind="attn"``) or MLP down projection (``kind="mlp"``), creating the bias if the
    Linear has none."""
    linear = _output_linear(adapter, layer, kind)
    if kind == "mlp" and adapter.experts(layer) is not None:
        raise ValueError(f"layer {layer}: a mixture-of-experts block has no output bias to add to")
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
    return {kind: [getattr(_output_linear(adapter, layer, kind), "bias", None) is not None
                   for layer in range(adapter.num_layers)]
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
