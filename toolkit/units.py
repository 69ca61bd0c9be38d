"""Unit-level data passed between stages: scores, selections, transform results.

A *unit* is what structured pruning removes: an attention unit (one head; for grouped-query
attention one KV group, i.e. a key/value head with all query heads that share it) or an MLP
neuron (for a gated MLP the gate row, the up row and the down column together). Per-layer
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
    """Units to keep: sorted indices per layer, into the model's current units."""

    heads: list[list[int]]
    neurons: list[list[int]]

    def __post_init__(self) -> None:
        self.heads = [sorted(int(i) for i in h) for h in self.heads]
        self.neurons = [sorted(int(i) for i in n) for n in self.neurons]

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

    def check(self, head_counts: list[int], neuron_counts: list[int]) -> None:
        """Raise ValueError unless every index is valid for the model's unit counts."""
        for kind, sel, counts in (("heads", self.heads, head_counts), ("neurons", self.neurons, neuron_counts)):
            if len(sel) != len(counts):
                raise ValueError(f"selection.{kind}: {len(sel)} layers, the model has {len(counts)}")
            for layer, (keep, n) in enumerate(zip(sel, counts)):
                if len(set(keep)) != len(keep) or any(i < 0 or i >= n for i in keep):
                    raise ValueError(f"selection.{kind}[{layer}] = {keep} is not a set of indices in [0, {n})")

    def widths(self) -> dict[str, list[int]]:
        return {"heads": [len(h) for h in self.heads], "neurons": [len(n) for n in self.neurons]}

    def to_json(self) -> dict[str, list[list[int]]]:
        return {"heads": self.heads, "neurons": self.neurons}


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
