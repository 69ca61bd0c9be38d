"""Per-channel statistics of what enters each layer's output projections (attention output
projection and MLP down projection), from calibration data, one layer at a time.

Several LLM pruning baselines score a unit by the activations feeding its columns of the
output / down projection: Wanda-sp by their norm, FLAP by their variance (and compensate
removed units with their mean). :func:`output_input_stats` runs the model layer by layer
through :class:`tshrink.calibration.LayerStream` (one layer on the device, statistics
accumulated per batch in float64, nothing kept but hidden states and the sums) and returns,
per layer, :class:`ChannelStats` for the attention output projection's input and the down
projection's input. Only real tokens (attention mask 1) count. The model is not changed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch.base import Adapter
from .calibration import CalibrationData, LayerStream


@dataclass
class ChannelStats:
    """Running sums over calibration tokens of one Linear's input channels."""

    sum: torch.Tensor  # (channels,) float64: sum of x_j over tokens
    sumsq: torch.Tensor  # (channels,) float64: sum of x_j^2 over tokens
    tokens: int = 0
    sequences: int = 0

    @classmethod
    def zeros(cls, channels: int) -> "ChannelStats":
        return cls(torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))

    def add(self, x: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Accumulate a batch: ``x`` (batch, seq, channels), ``token_mask`` (batch, seq) bool."""
        real = x[token_mask.bool()].to(torch.float64).cpu()  # (tokens, channels)
        self.sum += real.sum(0)
        self.sumsq += real.pow(2).sum(0)
        self.tokens += int(real.shape[0])
        self.sequences += int(x.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """(channels,) mean over tokens."""
        return self.sum / max(self.tokens, 1)

    @property
    def var(self) -> torch.Tensor:
        """(channels,) population variance over tokens (clamped at 0 against rounding)."""
        mean = self.mean
        return (self.sumsq / max(self.tokens, 1) - mean * mean).clamp_min(0)


def output_input_stats(adapter: Adapter, calib: CalibrationData, *, device: torch.device | str | None = None,
                       ) -> tuple[list[ChannelStats], list[ChannelStats]]:
    """(attention, mlp): per layer the statistics of the inputs of the attention output
    projection (units*group*head_dim channels) and of the down projection (neurons), taken on
    the model as it is (dense statistics), one layer at a time."""
    stream = LayerStream(adapter, calib, device=device)
    attn, mlp = [], []
    for layer in range(adapter.num_layers):
        a = ChannelStats.zeros(adapter.attn(layer).o.in_features)
        m = ChannelStats.zeros(adapter.mlp(layer).out.in_features)
        with stream.capture(adapter.attn(layer).o, a.add), stream.capture(adapter.mlp(layer).out, m.add):
            stream.advance()
        attn.append(a)
        mlp.append(m)
    return attn, mlp
