"""Analytic cost model: multiply-adds per attention unit, per neuron, per layer.

Convention (the same as fvcore's, stated in every table): one multiply-add counts as one
FLOP; costs are for ONE sequence of ``seq_len`` tokens; attention scores are counted over
the full ``seq_len x seq_len`` square (also for causal models); bias additions, softmax and
activations are not counted; LayerNorm counts 5 per element, as fvcore's handle does
(RMSNorm is built from elementwise ops that fvcore does not count, so it counts 0 here).
Embedding look-ups, the pooler and task heads (classifier, LM head) are outside the count:
budgets and reported FLOPs cover the backbone's hidden states, as in Kwon et al.

Per token, one attention unit with ``g`` query heads of size ``d`` sharing one K/V head
costs ``hidden*d*(2g+2)`` in the projections (Q and O: ``g*d*hidden`` each, K and V:
``d*hidden`` each) plus ``2*g*seq_len*d`` for the scores and the weighted sum, i.e. a
per-unit part (K, V) plus ``g`` times a per-query-head part; one MLP neuron
costs ``2*hidden`` (``3*hidden`` for a gated MLP); in a mixture-of-experts layer a token runs
only the ``top_k`` of ``E`` experts it is routed to, so one expert neuron costs
``3*hidden*top_k/E`` per token -- exact for the layer whenever every expert keeps the same
number of neurons, which pruning guarantees -- and the router (``hidden*E``) and a shared
expert are width-independent (:meth:`Adapter.neuron_macs`). Families with further attention terms
(DeBERTa's relative-position projections and scores) add them per unit through
:meth:`Adapter.extra_macs`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .arch.base import Adapter
from .units import Selection


@dataclass(frozen=True)
class LayerCost:
    """MACs for one sequence: per attention unit (at the layer's group size when the cost
    model was built), per neuron, and width-independent. ``kv`` + ``group * query_head`` is
    the unit cost at another group size (query-head units under GQA)."""

    head: int
    neuron: int
    fixed: int
    kv: int = 0  # per unit: its K and V projections (and per-unit extras)
    query_head: int = 0  # per query head: its Q and O projections, scores and weighted sum

    def macs(self, heads: int, neurons: int, group: int | None = None) -> int:
        unit = self.head if group is None else self.kv + group * self.query_head
        return self.fixed + heads * unit + neurons * self.neuron


class CostModel:
    """Costs of a model's transformer layers at a given sequence length.

    The reference widths (``dense``) are the model's widths when the cost model is built, so
    a FLOPs fraction always means "of the model that was handed in".
    """

    def __init__(self, adapter: Adapter, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
        self.seq_len = seq_len
        h, s = adapter.hidden_size, seq_len
        per_layer_norm, outside_norm = adapter.norm_macs_per_token()
        self.layers: list[LayerCost] = []
        for layer in range(adapter.num_layers):
            p = adapter.attn(layer)
            d, g = p.head_dim, p.group
            extra_head, extra_fixed = adapter.extra_macs(layer, s)
            kv, query_head = 2 * s * h * d + extra_head, 2 * s * h * d + 2 * s * s * d
            neuron, mlp_fixed = adapter.neuron_macs(layer, s)
            self.layers.append(LayerCost(head=kv + g * query_head, neuron=neuron,
                                         fixed=s * per_layer_norm + extra_fixed + mlp_fixed,
                                         kv=kv, query_head=query_head))
        self.outside = s * outside_norm + adapter.outside_extra_macs(s)
        self.groups = adapter.group_sizes()
        self.dense = adapter.widths()

    # -- totals ---------------------------------------------------------------------
    def layer_macs(self, widths: dict[str, list[int]] | Selection | None = None) -> list[int]:
        """MACs of each transformer layer for ``widths`` (default: the dense widths)."""
        w = self._widths(widths)
        groups = w.get("group") or [None] * len(self.layers)
        return [c.macs(nh, nn, g) for c, nh, nn, g in zip(self.layers, w["heads"], w["neurons"], groups)]

    def macs(self, widths: dict[str, list[int]] | Selection | None = None) -> int:
        """MACs of all transformer layers (what budgets are a fraction of)."""
        return sum(self.layer_macs(widths))

    def backbone_macs(self, widths: dict[str, list[int]] | Selection | None = None) -> int:
        """MACs of the whole backbone as fvcore counts it (layers + norms/pooler outside)."""
        return self.macs(widths) + self.outside

    def fraction(self, widths: dict[str, list[int]] | Selection) -> float:
        """Fraction of the dense layers' MACs that ``widths`` keeps."""
        return self.macs(widths) / self.macs()

    def budget_macs(self, budget: float) -> float:
        """Absolute MACs allowed by a kept fraction ``budget``."""
        check_budget(budget)
        return budget * self.macs()

    def _widths(self, widths: dict[str, list[int]] | Selection | None) -> dict[str, list[int]]:
        if widths is None:
            return self.dense
        if isinstance(widths, Selection):
            return widths.widths(self.groups if widths.query_heads is not None else None)
        return widths

    def table(self) -> list[dict[str, int]]:
        """Per-layer costs, for reports."""
        return [
            {"layer": i, "head_unit_macs": c.head, "query_head_macs": c.query_head, "neuron_macs": c.neuron,
             "fixed_macs": c.fixed}
            for i, c in enumerate(self.layers)
        ]


def check_budget(budget: float) -> float:
    """Return ``budget`` if it is a kept-FLOPs fraction in (0, 1], else raise ValueError."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"FLOPs budget {budget!r} is not a number; give the kept fraction in (0, 1], e.g. 0.5") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"FLOPs budget {budget!r} is outside (0, 1]: it is the fraction of FLOPs kept (0.5 = 2x fewer)")
    return value
