"""Mask rearrangement within a layer (Kwon et al. 2022, section 4.3, greedy swap).

The search (``search.py``) decides HOW MANY units of each layer to keep from the Fisher
diagonal alone. Rearrangement then chooses WHICH units of the layer to prune using the
layer's whole Fisher block: the loss increase of pruning the set ``P`` is estimated by

    1/2 (1 - m)^T F (1 - m) = 1/2 || sum_{i in P} g_i ||^2,     g_i = grads[:, i]  # (batches,)

(``fisher_math.fisher_loss_increase``), so units whose gradients cancel can be pruned
together at little cost even if each one alone looks important.

Greedy, as in the public code: start from the pruned set of the input mask; visit the
kept units in ascending Fisher importance; add each to the pruned set and drop again the
member whose removal leaves the smallest ``|| sum g ||^2``. Dropping the unit just added
restores the previous set, so the estimate never increases, and the pruned count is
unchanged. In the paper the input is the search's mask, i.e. the layer's lowest-importance
units, which is exactly the public code's starting point.

Cost: one pass over the kept units, each step one ``(batches,) @ (batches, P+1)`` product,
i.e. ``O(kept * pruned * batches)`` per layer, on CPU in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tshrink_plugins.fisher.fisher_math import _check_grads


def rearrange_mask(mask: Tensor, grads: Tensor) -> Tensor:
    """Re-choose which units of one layer are pruned, keeping how many are kept.

    ``mask`` (U,): boolean (True = kept) or float with values 0/1; ``grads`` (batches, U):
    the gradients of this layer's masks at ``m = 1`` (per mini-batch or per example).
    Returns a new mask of the same dtype and device whose Fisher loss estimate
    ``1/2 (1-m)^T F (1-m)`` is <= that of ``mask``. A mask with no unit or every unit
    pruned is returned unchanged (as a copy).
    """
    _check_grads(grads)
    if grads.ndim != 2:
        raise ValueError(f"grads must have shape (batches, U) for one layer, got {tuple(grads.shape)}")
    if not isinstance(mask, Tensor) or mask.ndim != 1 or mask.shape[0] != grads.shape[1]:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a 1-D tensor of length U={grads.shape[1]} (grads' units), got {shape}")
    keep = mask.bool() if mask.dtype == torch.bool else (mask == 1)
    if mask.dtype != torch.bool and not (keep | (mask == 0)).all():
        raise ValueError(f"a float mask must hold only 0 and 1 to be rearranged, got values {mask.unique().tolist()}")
    keep = keep.cpu()
    n_kept = int(keep.sum())
    if n_kept == 0 or n_kept == keep.shape[0]:
        return mask.clone()

    g = grads.detach().to("cpu", torch.float64)  # (batches, U)
    importance = g.pow(2).sum(0)  # (U,) Fisher diagonal = ||g_i||^2
    by_importance = torch.sort(importance, stable=True).indices  # ascending
    pruned = by_importance[~keep[by_importance]]  # (P,) current pruned set
    visit = by_importance[keep[by_importance]]  # (U-P,) kept units, least important first
    total = g[:, pruned].sum(1)  # (batches,) sum of the pruned units' gradients

    for j in visit.tolist():
        total = total + g[:, j]
        candidates = torch.cat([pruned, pruned.new_tensor([j])])  # (P+1,)
        # ||total - g_i||^2 = ||total||^2 - 2 total.g_i + ||g_i||^2; the first term is shared.
        after_drop = importance[candidates] - 2.0 * (total @ g[:, candidates])  # (P+1,)
        drop = int(torch.argmin(after_drop))
        total = total - g[:, candidates[drop]]
        pruned = torch.cat([candidates[:drop], candidates[drop + 1:]])

    new_keep = torch.ones_like(keep)
    new_keep[pruned] = False
    return new_keep.to(device=mask.device, dtype=mask.dtype)


def heldout_loss(grads: Tensor, n_kept: int, folds: int = 2) -> tuple[float, float] | None:
    """Fisher loss of a layer's selection on gradient rows it was NOT chosen from.

    The rows of ``grads`` (batches, U) are split into ``folds`` interleaved parts. For each
    part, the ``n_kept`` units of largest Fisher importance on the OTHER rows are kept,
    rearranged on those rows, and the Fisher loss estimate of that mask is taken per row on
    the other rows (in-sample) and on the part's rows (held out). Returns the two per-row
    means ``(in_sample, held_out)``, or None with fewer than ``folds`` rows. A held-out
    loss well above the in-sample one means the Fisher matrix has too few rows for the
    rearrangement to generalise.
    """
    from tshrink_plugins.fisher.fisher_math import fisher_loss_increase

    _check_grads(grads)
    rows, units = grads.shape
    if rows < folds or folds < 2:
        return None
    inside = held = 0.0
    for k in range(folds):
        test = torch.arange(k, rows, folds)
        train = torch.tensor([i for i in range(rows) if i % folds != k])
        g_train, g_test = grads[train], grads[test]
        keep = torch.zeros(units, dtype=torch.bool)
        keep[torch.sort(g_train.double().pow(2).sum(0), descending=True, stable=True).indices[:n_kept]] = True
        keep = rearrange_mask(keep, g_train)
        inside += float(fisher_loss_increase(keep, g_train)) / len(train)
        held += float(fisher_loss_increase(keep, g_test)) / len(test)
    return inside / folds, held / folds
