"""The adapter interface shared by all architectures.

An adapter answers, for layer ``l`` of a supported model: which Linear modules hold the
attention units (rows of Q/K/V, columns of the output projection) and the MLP neurons
(rows of up/gate, columns of down), how many units there are now, and how to replace the
attention block when a layer loses every unit. Everything else (masking, surgery, cost,
calibration) is written once against this interface.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Proj:
    """A Linear-shaped view of (part of) a projection module.

    Consumers read ``weight`` as ``(out, in)`` like ``nn.Linear`` whatever the storage:
    ``transposed`` for GPT-2's ``Conv1D`` (stored ``(in, out)``), ``rows`` for one block of
    a fused projection (Phi-3's ``qkv_proj``: a slice; GPT-NeoX's per-head interleaved
    ``query_key_value``: an index). For a whole module or a contiguous slice ``weight`` and
    ``bias`` are views, so in-place edits (weight folding) reach the model; for an index
    they are copies (read only). Hooks go to the underlying module, which is only
    meaningful for a view of the whole module (output and down projections).
    """

    def __init__(self, module: nn.Module, *, transposed: bool = False,
                 rows: slice | torch.Tensor | None = None) -> None:
        self.module, self.transposed, self.rows = module, transposed, rows

    def _full(self) -> torch.Tensor:
        w = self.module.weight
        return w.t() if self.transposed else w  # (out, in)

    @property
    def weight(self) -> torch.Tensor:
        w = self._full()
        if self.rows is None:
            return w
        return w[self.rows] if isinstance(self.rows, slice) else w.index_select(0, self.rows.to(w.device))

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.module.bias
        if b is None or self.rows is None:
            return b
        return b[self.rows] if isinstance(self.rows, slice) else b.index_select(0, self.rows.to(b.device))

    @property
    def in_features(self) -> int:
        return int(self._full().shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def register_forward_pre_hook(self, *args, **kwargs):
        return self.module.register_forward_pre_hook(*args, **kwargs)

    def register_forward_hook(self, *args, **kwargs):
        return self.module.register_forward_hook(*args, **kwargs)


def module_of(proj: nn.Module | Proj) -> nn.Module:
    """The model's module behind a projection (itself for a plain ``nn.Linear``)."""
    return proj.module if isinstance(proj, Proj) else proj


def row_index(proj: nn.Module | Proj, index: torch.Tensor) -> torch.Tensor:
    """Rows of the underlying module (Linear orientation) for rows ``index`` of ``proj``."""
    if not isinstance(proj, Proj) or proj.rows is None:
        return index
    if isinstance(proj.rows, slice):
        return index + (proj.rows.start or 0)
    return proj.rows.to(index.device)[index]


@dataclass
class AttnParts:
    """One layer's attention projections. ``q``/``k``/``v`` are None once every unit is gone.

    A unit is ``group`` query heads sharing one key/value head (``group == 1`` for
    multi-head attention), so unit ``u`` owns Q rows ``[u*group*d, (u+1)*group*d)``, K/V rows
    ``[u*d, (u+1)*d)`` and output-projection columns ``[u*group*d, (u+1)*group*d)``.
    """

    q: nn.Linear | Proj | None
    k: nn.Linear | Proj | None
    v: nn.Linear | Proj | None
    o: nn.Linear | Proj
    head_dim: int
    group: int

    @property
    def units(self) -> int:
        return self.o.in_features // (self.head_dim * self.group)


@dataclass
class MlpParts:
    """One layer's MLP: ``inputs`` have one row per neuron (``[gate, up]`` for a gated MLP),
    ``out`` has one column per neuron."""

    inputs: list[nn.Linear | Proj]
    out: nn.Linear | Proj

    @property
    def neurons(self) -> int:
        return self.out.in_features


class EmptyAttention(nn.Module):
    """Stands in for an attention block whose every unit was pruned.

    It keeps the output projection (now ``Linear(0, hidden)``: its bias, if any, is the
    block's whole output) under the original attribute name so checkpoints keep their keys,
    and returns ``(output, None)`` like the Hugging Face attention modules do.
    """

    def __init__(self, out_proj: nn.Linear | None, out_name: str | None) -> None:
        super().__init__()
        self.out_name = out_name
        if out_proj is not None and out_name is not None:
            self.add_module(out_name, out_proj)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # (batch, seq, 0): no heads produce any output
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if self.out_name is None:
            return empty, None
        return getattr(self, self.out_name)(empty), None

    def extra_repr(self) -> str:
        return "every attention unit pruned"


class Adapter:
    """Base adapter; subclasses fill in the family-specific paths."""

    family: str = "?"
    model_types: tuple[str, ...] = ()
    gated_mlp: bool = False
    causal: bool = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # --- family-specific -----------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def attn(self, layer: int) -> AttnParts:
        raise NotImplementedError

    def mlp(self, layer: int) -> MlpParts:
        raise NotImplementedError

    def empty_attention(self, layer: int) -> None:
        """Replace layer ``layer``'s attention by an :class:`EmptyAttention`."""
        raise NotImplementedError

    def update_attn_attrs(self, layer: int, units: int) -> None:
        """Keep the attention module's bookkeeping attributes in step with its new width."""

    def update_mlp_attrs(self, layer: int, neurons: int) -> None:
        """Keep the MLP module's bookkeeping attributes in step with its new width."""

    def extra_head_projs(self, layer: int) -> list[nn.Linear | Proj]:
        """Further projections with one block of ``head_dim`` rows per attention unit
        (DeBERTa's relative-position projections); surgery slices them like Q."""
        return []

    def extra_macs(self, layer: int, seq_len: int) -> tuple[int, int]:
        """(per attention unit, width-independent) multiply-adds of layer ``layer`` for one
        sequence beyond the standard attention + MLP count (relative-position terms)."""
        return 0, 0

    def outside_extra_macs(self, seq_len: int) -> int:
        """Multiply-adds outside the layers beyond the norms (per sequence)."""
        return 0

    def norm_macs_per_token(self) -> tuple[int, int]:
        """(per layer, outside layers) multiply-adds that fvcore counts for normalisations."""
        return 0, 0

    def experts(self, layer: int) -> int | None:
        """Routed experts of layer ``layer``'s MLP (mixture-of-experts), None for a dense MLP.
        The MLP's neurons are then ``experts * per_expert`` (expert-major), and a selection
        must keep the same number in every expert."""
        return None

    def neuron_macs(self, layer: int, seq_len: int) -> tuple[int | float, int]:
        """(per MLP neuron, width-independent) multiply-adds of layer ``layer``'s MLP for one
        sequence (mixture-of-experts: per token only the experts it is routed to run)."""
        return seq_len * self.hidden_size * (3 if self.gated_mlp else 2), 0

    def first_neurons(self, layer: int, count: int) -> list[int]:
        """The first ``count`` neurons of layer ``layer`` (per expert for mixture-of-experts),
        the shape a checkpoint's recorded width stands for."""
        return list(range(count))

    # --- shared --------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def backbone(self) -> nn.Module:
        """The transformer without task head (BertModel, LlamaModel, ...)."""
        return getattr(self.model, "base_model", self.model)

    def head_counts(self) -> list[int]:
        return [self.attn(layer).units for layer in range(self.num_layers)]

    def neuron_counts(self) -> list[int]:
        return [self.mlp(layer).neurons for layer in range(self.num_layers)]

    def group_sizes(self) -> list[int]:
        """Query heads per attention unit in each layer, now (1 for multi-head attention)."""
        return [self.attn(layer).group for layer in range(self.num_layers)]

    def dense_group(self) -> int:
        """Query heads per KV head in the unpruned architecture (from the config)."""
        c = self.config
        heads = getattr(c, "num_attention_heads", None) or 1
        return heads // (getattr(c, "num_key_value_heads", None) or heads)

    def widths(self) -> dict[str, list[int]]:
        """Units and neurons per layer; plus ``"group"`` (query heads per unit) once some
        layer's group differs from the architecture's (query-head units were removed)."""
        out = {"heads": self.head_counts(), "neurons": self.neuron_counts()}
        groups = self.group_sizes()
        if any(g != self.dense_group() for g in groups):
            out["group"] = groups
        return out

    def unit_columns(self, layer: int, units: list[int] | torch.Tensor) -> torch.Tensor:
        """Indices of the output-projection input columns that belong to ``units``."""
        parts = self.attn(layer)
        width = parts.head_dim * parts.group
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
        return (units * width + torch.arange(width)).flatten()
