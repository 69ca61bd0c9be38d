"""Fisher quantities of structured masks (Kwon et al., NeurIPS 2022, section 4).

Every prunable unit (attention head, MLP neuron) gets a mask variable ``m_i`` that
multiplies its output; the dense model is ``m = 1``. With ``g_b = dL_b / dm`` at ``m = 1``
for mini-batch (or example) ``b``, the empirical Fisher of the masks is

    F = sum_b g_b g_b^T                                   # (units, units)

and the second-order estimate of the loss increase from a mask ``m`` (the first-order
term vanishes for a converged model) is

    dL(m) ~= 1/2 (1 - m)^T F (1 - m) = 1/2 sum_b (g_b . (1 - m))^2.

The paper treats ``F`` as block-diagonal per layer: its diagonal is the unit importance
used by the mask search (``search.py``), one layer's block drives the mask rearrangement
(``rearrange.py``). Both quantities here use the SUM over batches, not the mean; divide
by the number of batches if an expectation is wanted (rankings and argmins do not change).

The gradients themselves come from the model glue (backward through a model whose masks
are all ones); this module is pure tensor math.

Functions: ``fisher_importance`` (diagonal of F), ``fisher_loss_increase`` (the quadratic
form for one layer).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_grads(grads: Tensor, min_ndim: int = 2) -> None:
    if not isinstance(grads, Tensor):
        raise ValueError(f"grads must be a torch.Tensor of shape (batches, units), got {type(grads).__name__}")
    if grads.ndim < min_ndim:
        raise ValueError(f"grads must have shape (batches, units...), got shape {tuple(grads.shape)}")
    if grads.shape[0] == 0:
        raise ValueError("grads must hold at least one batch, got 0 rows")
    if not grads.is_floating_point():
        raise ValueError(f"grads must be a floating point tensor, got dtype {grads.dtype}")
    if not torch.isfinite(grads).all():
        raise ValueError("grads contain NaN or inf")


def fisher_importance(grads: Tensor) -> Tensor:
    """Empirical Fisher diagonal of the masks: ``sum_b grads[b] ** 2``.

    ``grads`` is ``(batches, *units)``, e.g. ``(batches, H)`` for one layer or
    ``(batches, L, H)`` for a whole model; the result has shape ``units`` and is at least
    float32 (half-precision gradients are accumulated in float32).
    """
    _check_grads(grads)
    if grads.dtype in (torch.float16, torch.bfloat16):
        grads = grads.float()
    return grads.pow(2).sum(dim=0)  # (*units,)


def fisher_loss_increase(mask: Tensor, grads: Tensor) -> Tensor:
    """Fisher estimate of the loss increase of one layer's mask: ``1/2 (1-m)^T F (1-m)``.

    ``mask`` is ``(U,)``, boolean (True = kept) or real (a tuned mask also works);
    ``grads`` is ``(batches, U)``, the gradients of that layer's masks at ``m = 1``.
    Computed through the gradients, ``1/2 sum_b (g_b . (1 - m))^2``, without forming F.
    Returns a float64 scalar tensor.
    """
    _check_grads(grads)
    if grads.ndim != 2:
        raise ValueError(f"grads must have shape (batches, U) for one layer, got {tuple(grads.shape)}")
    if not isinstance(mask, Tensor) or mask.ndim != 1 or mask.shape[0] != grads.shape[1]:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a 1-D tensor of length U={grads.shape[1]} (grads' units), got {shape}")
    removed = 1.0 - mask.to(torch.float64)  # (U,)
    per_batch = grads.to(torch.float64) @ removed  # (batches,)
    return 0.5 * per_batch.pow(2).sum()
