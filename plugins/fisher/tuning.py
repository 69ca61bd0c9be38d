"""Mask tuning: layer-wise least squares for the kept units' scales (Kwon et al. 2022, 4.4).

After pruning, the kept units of a layer get real-valued mask entries ``s`` so that the
pruned layer reproduces the dense layer's output on calibration data:

    min_s || C s - t ||^2 + lam * || s - 1 ||^2

``C`` (M, k): column i is kept unit i's contribution to the layer output, flattened over
tokens and hidden dims; ``t`` (M,): the dense output minus everything that does not depend
on the kept units (bias, residual), so ``C @ 1 == t`` for an unpruned layer. Writing
``s = 1 + x``, this is the damped least-squares problem ``min ||C x - r||^2 + lam ||x||^2``
with ``r = t - C @ 1``, which ``scipy.sparse.linalg.lsmr`` solves with ``damp = sqrt(lam)``
(``tune_scales``), or, from the accumulated normal equations ``CtC = C^T C`` and ``Ctt =
C^T t`` (streaming over many tokens), the k x k system ``(CtC + lam I) x = Ctt - CtC @ 1``
(``tune_scales_gram``). Both give the same scales.

Damping. ``damp`` is RELATIVE, so it means the same whatever the scale of the activations
or the number of tokens: ``lam = damp**2 * mean_i ||C[:, i]||^2 = damp**2 * trace(CtC) / k``.
``damp = 0`` is plain least squares. (The public code instead runs LSMR with an absolute
``damp=1`` on the normal equations, a different and scale-dependent regulariser.)

Rejection (scales all ones, ``accepted=False``), as in the public code: the solver did not
converge, the problem is too ill-conditioned (estimated condition number of the damped
matrix ``[C; sqrt(lam) I]`` above ``conlim``; for the Gram form, ``sqrt(cond(CtC + lam I))``),
or a scale falls outside ``bounds``. A layer whose contributions are all zero is rejected
too (nothing determines the scales). No kept unit: empty scales, accepted.

Known difference between the two solvers, only without damping: when ``damp = 0`` and
some units' contributions are EXACTLY linearly dependent, LSMR returns the minimum-norm
solution (smallest ``||s - 1||``, the limit of the damped solution) and LSMR's condition
estimate does not notice the null space, while the Gram form sees a singular matrix and
rejects. With ``damp > 0`` (the default) the damped matrix is well conditioned and both
agree. Nearly (not exactly) dependent units with ``damp = 0`` typically give huge
opposite scales, which ``bounds`` rejects in both.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse.linalg import lsmr
from torch import Tensor

DAMP = 1e-2  # lam = 1e-4 x the mean squared norm of a unit's contribution: guards near-collinear units
BOUNDS = (-10.0, 10.0)  # accepted range of a scale; the public code rejects outside [-10, 10]
CONLIM = 1e8  # reject when the damped problem's condition number exceeds this (LSMR's default)
TOL = 1e-10  # LSMR atol = btol (scipy's default 1e-6 is too loose to match the direct solve)
LSMR_OK = {0, 1, 2, 4, 5}  # istop codes meaning converged; 3/6: ill-conditioned, 7: iteration limit


def _check_options(damp: float, bounds: tuple[float, float], conlim: float) -> None:
    if not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0 (relative damping), got {damp!r}")
    if len(bounds) != 2 or not bounds[0] <= 1.0 <= bounds[1]:
        raise ValueError(f"bounds must be (lo, hi) with lo <= 1 <= hi (all-ones is the fallback), got {bounds!r}")
    if not conlim > 1:
        raise ValueError(f"conlim must be > 1, got {conlim!r}")


def _finish(x: np.ndarray, ok: bool, bounds: tuple[float, float], like: Tensor) -> tuple[Tensor, bool]:
    """Scales ``1 + x`` if ``ok`` and inside ``bounds``, else all ones; dtype/device of ``like``."""
    scales = 1.0 + x
    ok = ok and bool(np.all(np.isfinite(scales))) and bool(np.all((scales >= bounds[0]) & (scales <= bounds[1])))
    if not ok:
        scales = np.ones_like(x)
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.from_numpy(scales).to(device=like.device, dtype=dtype), ok


def tune_scales(
    contrib: Tensor,
    target: Tensor,
    *,
    damp: float = DAMP,
    bounds: tuple[float, float] = BOUNDS,
    conlim: float = CONLIM,
    tol: float = TOL,
    maxiter: int | None = None,
) -> tuple[Tensor, bool]:
    """Scales of the kept units by damped least squares towards 1, solved with LSMR.

    ``contrib`` (M, k): each kept unit's contribution to the layer output; ``target`` (M,):
    what they should sum to. ``damp``: relative damping (see module docstring); ``bounds``:
    accepted scale range; ``conlim``: condition-number limit; ``tol``: LSMR atol/btol;
    ``maxiter``: LSMR iterations (None: ``max(10 k, 50)``). Returns ``(scales (k,), accepted)``;
    when not accepted the scales are all ones. Needs C in memory (float64 copy on CPU):
    for many tokens accumulate the normal equations and use ``tune_scales_gram``.
    """
    _check_options(damp, bounds, conlim)
    if not isinstance(contrib, Tensor) or contrib.ndim != 2:
        raise ValueError(f"contrib must be a (M, k) tensor, got {getattr(contrib, 'shape', type(contrib).__name__)}")
    if not isinstance(target, Tensor) or target.shape != (contrib.shape[0],):
        raise ValueError(f"target must have shape ({contrib.shape[0]},) to match contrib, got {getattr(target, 'shape', None)}")
    c = contrib.detach().to("cpu", torch.float64).numpy()  # (M, k)
    t = target.detach().to("cpu", torch.float64).numpy()  # (M,)
    if not (np.isfinite(c).all() and np.isfinite(t).all()):
        raise ValueError("contrib and target must be finite (got NaN or inf)")
    k = c.shape[1]
    if k == 0:
        return _finish(np.zeros(0), True, bounds, contrib)
    mean_sq = float((c * c).sum()) / k  # trace(CtC) / k
    if mean_sq == 0.0:
        return _finish(np.zeros(k), False, bounds, contrib)

    residual = t - c.sum(1)  # (M,) what the all-ones scales miss
    out = lsmr(c, residual, damp=damp * math.sqrt(mean_sq), atol=tol, btol=tol, conlim=conlim,
               maxiter=maxiter if maxiter is not None else max(10 * k, 50))
    x, istop = out[0], out[1]
    return _finish(x, istop in LSMR_OK, bounds, contrib)


def tune_scales_gram(
    CtC: Tensor,
    Ctt: Tensor,
    *,
    damp: float = DAMP,
    bounds: tuple[float, float] = BOUNDS,
    conlim: float = CONLIM,
) -> tuple[Tensor, bool]:
    """``tune_scales`` from the normal equations ``CtC = C^T C`` (k, k), ``Ctt = C^T t`` (k,).

    Same problem, options and result (up to solver tolerance) as ``tune_scales``; for
    streaming, sum ``C_b^T C_b`` and ``C_b^T t_b`` over token batches ``b`` (in float64 if
    there are many). Solved directly: symmetric eigen-decomposition for the condition
    check, then a Cholesky solve of ``(CtC + lam I) x = Ctt - CtC @ 1``.
    """
    _check_options(damp, bounds, conlim)
    if not isinstance(CtC, Tensor) or CtC.ndim != 2 or CtC.shape[0] != CtC.shape[1]:
        raise ValueError(f"CtC must be a square (k, k) tensor, got {getattr(CtC, 'shape', type(CtC).__name__)}")
    k = CtC.shape[0]
    if not isinstance(Ctt, Tensor) or Ctt.shape != (k,):
        raise ValueError(f"Ctt must have shape ({k},) to match CtC, got {getattr(Ctt, 'shape', None)}")
    a = CtC.detach().to("cpu", torch.float64)  # (k, k)
    b = Ctt.detach().to("cpu", torch.float64)  # (k,)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("CtC and Ctt must be finite (got NaN or inf)")
    if k == 0:
        return _finish(np.zeros(0), True, bounds, CtC)
    scale = float(a.abs().max())
    if float((a - a.T).abs().max()) > 1e-4 * scale:
        raise ValueError("CtC must be symmetric (C^T C); got an asymmetric matrix")
    mean_sq = float(torch.diagonal(a).sum()) / k
    if mean_sq <= 0.0:
        return _finish(np.zeros(k), False, bounds, CtC)

    gram = 0.5 * (a + a.T)
    rhs = b - gram.sum(1)  # (k,) C^T r with r = t - C @ 1
    a = gram + (damp**2 * mean_sq) * torch.eye(k, dtype=torch.float64)  # (k, k) CtC + lam I
    eig = torch.linalg.eigvalsh(a)  # ascending
    if eig[0] <= 0 or math.sqrt(float(eig[-1] / eig[0])) > conlim:
        return _finish(np.zeros(k), False, bounds, CtC)
    chol = torch.linalg.cholesky(a)
    x = torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)  # (k,)
    return _finish(x.numpy(), True, bounds, CtC)
