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


@dataclass
class AttnParts:
    """One layer's attention projections. ``q``/``k``/``v`` are None once every unit is gone.

    A unit is ``group`` query heads sharing one key/value head (``group == 1`` for
    multi-head attention), so unit ``u`` owns Q rows ``[u*group*d, (u+1)*group*d)``, K/V rows
    ``[u*d, (u+1)*d)`` and output-projection columns ``[u*group*d, (u+1)*group*d)``.
    """

    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear
    head_dim: int
    group: int

    @property
    def units(self) -> int:
        return self.o.in_features // (self.head_dim * self.group)


@dataclass
class MlpParts:
    """One layer's MLP: ``inputs`` have one row per neuron (``[gate, up]`` for a gated MLP),
    ``out`` has one column per neuron."""

    inputs: list[nn.Linear]
    out: nn.Linear

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

    def norm_macs_per_token(self) -> tuple[int, int]:
        """(per layer, outside layers) multiply-adds that fvcore counts for normalisations."""
        return 0, 0

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

    def widths(self) -> dict[str, list[int]]:
        return {"heads": self.head_counts(), "neurons": self.neuron_counts()}

    def unit_columns(self, layer: int, units: list[int] | torch.Tensor) -> torch.Tensor:
        """Indices of the output-projection input columns that belong to ``units``."""
        parts = self.attn(layer)
        width = parts.head_dim * parts.group
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
        return (units * width + torch.arange(width)).flatten()
