"""Wanda-sp scores (pure math): the structured Wanda baseline as the FLAP code runs it.

For input channel ``j`` of an output projection ``W`` (out, in): ``s_j = mean_i |W_ij| *
||X_j||``, with ``||X_j||^2`` the sum of squares of channel ``j`` over the calibration tokens
divided by the number of calibration sequences (the reference code's running ``scaler_row``).
A head (here: a KV group with its query heads) scores the sum of its channels, a neuron its
channel of the down projection. (Wanda, Sun et al. 2023, scores single weights by
``|W_ij| * ||X_j||``; the structured variant aggregates that over a unit's columns.)
"""
from __future__ import annotations

import torch
from torch import Tensor


def channel_scores(sumsq: Tensor, sequences: int, weight: Tensor) -> Tensor:
    """(in,) ``mean_i |W_ij| * sqrt(sumsq_j / sequences)`` for ``weight`` (out, in)."""
    if sumsq.shape != (weight.shape[1],):
        raise ValueError(f"statistics of shape {tuple(sumsq.shape)} for a weight with {weight.shape[1]} columns")
    norm = (sumsq.double() / max(sequences, 1)).sqrt()
    return weight.detach().double().abs().mean(0) * norm


def unit_sums(channels: Tensor, width: int) -> Tensor:
    """(units,) sum of each consecutive block of ``width`` channels."""
    return channels.reshape(-1, width).sum(1) if channels.numel() else channels.new_zeros(0)
