"""The math of the Wanda-sp example, testable without pluggy (shapes in comments)."""
from __future__ import annotations

import torch


def wanda_sp_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """Structured Wanda: a unit's score is ``sum_i sum_{j in unit} |W_ij| * ||x_j||``.

    weight: (out, units, width), the projection's columns grouped by unit;
    col_norm: (units, width), ``||x_j||_2`` of each input column over the calibration tokens.
    Returns (units,).
    """
    return (weight.abs().double() * col_norm.double()[None]).sum((0, 2))


def least_squares_fold(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                       damping: float = 1e-4) -> torch.Tensor:
    """New weights (out, k) for the kept input columns ``keep`` (k,) so that, on the calibration
    inputs ``A`` (tokens, n) with Gram ``G = A^T A`` (n, n), ``A_K W_K'^T`` is the least-squares
    fit of ``A W^T``: ``W_K'^T = (G_KK + lam I)^-1 G_K: W^T``, ``lam = damping * mean(diag G_KK)``."""
    G = gram.double()
    W = weight.detach().to(G.device, torch.float64)  # (out, n)
    Gkk = G[keep][:, keep]  # (k, k)
    lam = damping * Gkk.diagonal().mean().clamp(min=1e-30)
    eye = torch.eye(len(keep), dtype=G.dtype, device=G.device)
    return torch.linalg.solve(Gkk + lam * eye, G[keep] @ W.T).T  # (out, k)
