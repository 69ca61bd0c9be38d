"""Unit-level data passed between stages: scores, selections, transform results.

A *unit* is what structured pruning removes: an attention unit (one head; for grouped-query
attention one KV group, i.e. a key/value head with all query heads that share it) or an MLP
neuron (for a gated MLP the gate row, the up row and the down column together). Under
grouped-query attention a selection may also drop query heads inside the kept groups
(``Selection.query_heads``: the same number kept in every group of a layer). Per-layer
counts may differ (a model pruned before has non-uniform widths).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class UnitScores:
    """Importance of every unit; higher means more important.

    ``heads[l]`` has shape ``(n_head_units_l,)``, ``neurons[l]`` ``(n_neurons_l,)``.
    ``extra`` carries whatever later stages of the same plugin need (e.g. per-batch mask
    gradients for rearrangement, per-layer error curves).
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, head_counts: list[int], neuron_counts: list[int]) -> None:
        """Raise ValueError if the shapes do not match the model's unit counts."""
        for kind, got, want in (("heads", self.heads, head_counts), ("neurons", self.neurons, neuron_counts)):
            if len(got) != len(want):
                raise ValueError(f"scores.{kind}: {len(got)} layers, the model has {len(want)}")
            for layer, (t, n) in enumerate(zip(got, want)):
                if tuple(t.shape) != (n,):
                    raise ValueError(f"scores.{kind}[{layer}]: shape {tuple(t.shape)}, expected ({n},)")
                if not torch.isfinite(t).all():
                    raise ValueError(f"scores.{kind}[{layer}] contains NaN or inf")


@dataclass
class Selection:
    """Units to keep: sorted indices per layer, into the model's current units.

    ``query_heads`` (optional, grouped-query attention): per layer the query heads kept,
    as indices ``unit * group + j`` into the layer's current query heads; every kept unit
    (KV group) of a layer keeps the same number ``g'`` of its ``group`` query heads, so the
    result is a GQA layer with groups of ``g'``. ``None`` (or ``None`` for a layer): every
    query head of the kept units.
    """

    heads: list[list[int]]
    neurons: list[list[int]]
    query_heads: list[list[int] | None] | None = None

    def __post_init__(self) -> None:
        self.heads = [sorted(int(i) for i in h) for h in self.heads]
        self.neurons = [sorted(int(i) for i in n) for n in self.neurons]
        if self.query_heads is not None:
            self.query_heads = [None if q is None else sorted(int(i) for i in q) for q in self.query_heads]

    def group_sizes(self, groups: list[int]) -> list[int]:
        """Query heads per kept unit in each layer, given the layers' current ``groups``;
        ValueError when a layer's kept units keep different numbers, or heads of dropped units."""
        out = list(groups)
        for layer, q in enumerate(self.query_heads or []):
            if q is None:
                continue
            g, kept = groups[layer], self.heads[layer]
            per = {u: 0 for u in kept}
            for i in q:
                if i // g not in per:
                    raise ValueError(f"selection.query_heads[{layer}]: head {i} belongs to unit {i // g}, "
                                     f"which is not kept ({kept})")
                per[i // g] += 1
            sizes = set(per.values())
            if len(sizes) > 1 or 0 in sizes:
                raise ValueError(f"selection.query_heads[{layer}]: kept units keep {sorted(sizes)} query heads; "
                                 "every kept unit must keep the same number (>= 1)")
            out[layer] = sizes.pop() if sizes else g
        return out

    @classmethod
    def full(cls, head_counts: list[int], neuron_counts: list[int]) -> "Selection":
        return cls([list(range(n)) for n in head_counts], [list(range(n)) for n in neuron_counts])

    @classmethod
    def from_masks(cls, head_masks: list[torch.Tensor], neuron_masks: list[torch.Tensor]) -> "Selection":
        """From boolean (or 0/1) masks per layer."""
        return cls(
            [torch.nonzero(m.bool()).flatten().tolist() for m in head_masks],
            [torch.nonzero(m.bool()).flatten().tolist() for m in neuron_masks],
        )

    def masks(self, head_counts: list[int], neuron_counts: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Float 0/1 masks per layer for the given unit counts."""
        hm = [torch.zeros(n) for n in head_counts]
        nm = [torch.zeros(n) for n in neuron_counts]
        for m, keep in zip(hm + nm, self.heads + self.neurons):
            m[keep] = 1.0
        return hm, nm

    def query_head_masks(self, head_counts: list[int], groups: list[int]) -> list[torch.Tensor | None]:
        """Float 0/1 masks over each layer's query heads ``(units * group,)`` (None where
        ``query_heads`` keeps every head of the kept units)."""
        out: list[torch.Tensor | None] = [None] * len(head_counts)
        for layer, q in enumerate(self.query_heads or []):
            if q is not None:
                out[layer] = torch.zeros(head_counts[layer] * groups[layer])
                out[layer][q] = 1.0
        return out

    def check(self, head_counts: list[int], neuron_counts: list[int]) -> None:
        """Raise ValueError unless every index is valid for the model's unit counts."""
        for kind, sel, counts in (("heads", self.heads, head_counts), ("neurons", self.neurons, neuron_counts)):
            if len(sel) != len(counts):
                raise ValueError(f"selection.{kind}: {len(sel)} layers, the model has {len(counts)}")
            for layer, (keep, n) in enumerate(zip(sel, counts)):
                if len(set(keep)) != len(keep) or any(i < 0 or i >= n for i in keep):
                    raise ValueError(f"selection.{kind}[{layer}] = {keep} is not a set of indices in [0, {n})")

    def widths(self, groups: list[int] | None = None) -> dict[str, list[int]]:
        """Kept units and neurons per layer; with ``query_heads`` and the layers' current
        ``groups`` also ``"group"``, the query heads per kept unit (without ``groups`` the
        group sizes are left out: they need the model's)."""
        out = {"heads": [len(h) for h in self.heads], "neurons": [len(n) for n in self.neurons]}
        if self.query_heads is not None and groups is not None:
            out["group"] = self.group_sizes(groups)
        return out

    def to_json(self) -> dict[str, list[list[int]]]:
        out = {"heads": self.heads, "neurons": self.neurons}
        if self.query_heads is not None:
            out["query_heads"] = self.query_heads
        return out


@dataclass
class TransformResult:
    """What a transform stage (quantization, unstructured sparsity) hands back to the host.

    ``tensors``: the compact form, saved by the host as ``compressed.safetensors`` next to
    the checkpoint (flat name -> tensor; keys are prefixed by the stage name when saved).
    ``meta``: JSON-serialisable information the plugin needs to restore the compact form.
    ``report``: figures for the JSON report (bits per weight, sparsity, ...).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
