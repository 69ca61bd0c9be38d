"""Iterative magnitude pruning (unstructured): zero the smallest |w|, step by step.

A schedule such as ``"30,50"`` prunes to 30 % sparsity, lets a recovery callback
fine-tune, then prunes to 50 %, and so on. Every step hits its sparsity exactly:
``round(sparsity * n)`` weights are pruned (halves rounded up), where ``n`` counts the
weights in scope (all tensors for ``"global"``, each tensor for ``"layer"``). Ranking is by
``|w|``; ties are broken by position (tensors in sorted-name order, then flat index), and
weights pruned by an earlier step rank below everything, so masks only ever shrink.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

SCOPES = ("global", "layer")

# recover(step, sparsity, masks): fine-tune between steps; masks[name] is bool, True = kept.
RecoverFn = Callable[[int, float, dict[str, Tensor]], None]


@dataclass
class IMPConfig:
    """Options of iterative magnitude pruning."""

    schedule: str = "30,50"  # target sparsities in order: percents ("30,50") or fractions ("0.3,0.5")
    scope: str = "global"  # "global": one ranking over all tensors; "layer": each tensor on its own


def imp_schedule(spec: str) -> list[float]:
    """Parse ``"30,50"`` / ``"0.3,0.5"`` / ``"30%,50%"`` into fractions ``[0.3, 0.5]``.

    Without ``%`` a list is read as percents if any entry is >= 1, else as fractions;
    lists mixing both (``"0.5,30"``) are ambiguous and rejected. The result must be
    strictly increasing, each value in ``[0, 1)``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"schedule must be a non-empty string like '30,50' or '0.3,0.5', got {spec!r}")
    parts = [p.strip() for p in spec.split(",")]
    values, percent_marks = [], []
    for p in parts:
        marked = p.endswith("%")
        try:
            v = float(p[:-1] if marked else p)
        except ValueError:
            raise ValueError(f"schedule entry {p!r} in {spec!r} is not a number; use e.g. '30,50' or '0.3,0.5'") from None
        if not math.isfinite(v):
            raise ValueError(f"schedule entry {p!r} in {spec!r} is not finite")
        values.append(v)
        percent_marks.append(marked)
    if any(v < 0 for v in values):
        raise ValueError(f"schedule {spec!r}: sparsities must lie in [0, 1) (or 0..100 percent), got {values}")
    if any(percent_marks):
        if not all(percent_marks):
            raise ValueError(f"schedule {spec!r} marks only some entries with '%'; mark all or none")
        fractions = [v / 100 for v in values]
    elif all(v < 1 for v in values):
        fractions = values
    elif all(v >= 1 for v in values):
        fractions = [v / 100 for v in values]
    else:
        raise ValueError(
            f"schedule {spec!r} mixes fractions (< 1) and percents (>= 1); write '30,50' or '0.3,0.5' or use '%'"
        )
    for f in fractions:
        if not 0 <= f < 1:
            raise ValueError(f"schedule {spec!r}: sparsity {f} is outside [0, 1) (percents: below 100)")
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"schedule {spec!r} must be strictly increasing, got {fractions}")
    return fractions


def n_pruned(sparsity: float, n: int) -> int:
    """Number of weights to prune out of ``n``: ``round(sparsity * n)``, halves up."""
    return math.floor(sparsity * n + 0.5)


def _check(weights: dict[str, Tensor], sparsity: float, scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not weights:
        raise ValueError("weights is empty; pass a dict name -> tensor")


def _prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Bool keep-mask over 1-D ``scores``: False for the ``k`` lowest (ties: lower index first)."""
    order = torch.sort(scores, stable=True).indices  # (n,)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[order[:k]] = False
    return keep


def magnitude_mask(
    weights: dict[str, Tensor],
    sparsity: float,
    scope: str = "global",
    previous: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep-masks (bool, True = kept) pruning the smallest ``|w|`` to exactly ``sparsity``.

    ``previous`` (masks of an earlier step) forces already-pruned weights to stay pruned;
    a ``sparsity`` too low to keep them all pruned raises ValueError.
    """
    _check(weights, sparsity, scope)
    names = sorted(weights)
    scores = {}
    for name in names:
        s = weights[name].detach().abs().flatten().float()  # (numel,)
        if previous is not None:
            if name not in previous or previous[name].shape != weights[name].shape:
                raise ValueError(f"previous masks lack {name!r} or have a different shape")
            s = torch.where(previous[name].flatten().to(s.device), s, torch.full_like(s, -1.0))
        scores[name] = s

    groups = [names] if scope == "global" else [[n] for n in names]
    masks: dict[str, Tensor] = {}
    for group in groups:
        flat = torch.cat([scores[n] for n in group])  # (n,)
        k = n_pruned(sparsity, flat.numel())
        already = int((flat < 0).sum())
        if already > k:
            where = "in total" if scope == "global" else f"in {group[0]!r}"
            raise ValueError(
                f"sparsity {sparsity} prunes {k} weights {where}, but {already} are already pruned; "
                "schedules must not decrease"
            )
        keep = _prune_lowest(flat, k)
        for name, part in zip(group, keep.split([scores[n].numel() for n in group])):
            masks[name] = part.reshape(weights[name].shape).to(weights[name].device)
    return masks


def iterative_magnitude_prune(
    weights: dict[str, Tensor],
    config: IMPConfig | None = None,
    recover: RecoverFn | None = None,
) -> dict[str, Tensor]:
    """Prune ``weights`` IN PLACE along ``config.schedule``; return the final keep-masks.

    After each step the pruned entries are zeroed and ``recover(step, sparsity, masks)``
    is called (steps count from 0; also after the last step). The masks are re-applied
    after the callback, so fine-tuning cannot revive pruned weights.
    """
    config = config or IMPConfig()
    steps = imp_schedule(config.schedule)
    masks: dict[str, Tensor] | None = None
    for step, sparsity in enumerate(steps):
        masks = magnitude_mask(weights, sparsity, config.scope, previous=masks)
        _apply(weights, masks)
        if recover is not None:
            recover(step, sparsity, masks)
            _apply(weights, masks)
    assert masks is not None  # imp_schedule never returns an empty list
    return masks


@torch.no_grad()
def _apply(weights: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    for name, mask in masks.items():
        weights[name].masked_fill_(~mask, 0)  # not mul_: inf * 0 would be NaN
