"""The math, kept apart from the plugin glue so it can be tested without pluggy."""
from __future__ import annotations

import torch


def random_scores(counts: list[int], generator: torch.Generator) -> list[torch.Tensor]:
    """One uniform random score in [0, 1) per unit, per layer."""
    return [torch.rand(n, generator=generator) for n in counts]
