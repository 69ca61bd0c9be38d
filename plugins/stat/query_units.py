"""Query-head units under grouped-query attention for STAT (pure math, no model, no pluggy).

A GQA layer has ``U`` KV groups of ``g`` query heads (``head_dim`` columns each of the output
projection's input ``X``, tokens x U*g*d). With query-head units a layer may keep ``U'`` of
its groups and ``g'`` query heads in every kept group (the same ``g'`` for all of them, so
the result is a GQA layer with groups of ``g'``). For every such *option* this module gives
the kept query heads and the exact calibration error of the least-squares fold of the
output projection onto them::

    E(K) = || X W^T - X_K W_K'^T ||_F^2 = tr(W R_K W^T),

``W`` (out, n) the output projection, ``R_K = G - G[:, K] G[K, K]^+ G[K, :]`` the residual
Gram (Schur complement) of ``G = X^T X`` after projecting out the kept columns ``K``.

Choice of heads (greedy, exact error reductions, :func:`greedy_blocks`): the query heads are
ranked by a greedy pass over all ``U*g`` heads (each step adds the head whose columns reduce
``E`` most); a group's ``g'`` kept heads are its first ``g'`` in that ranking. For whole-group
removal (``attention_units="both"``) the groups, each with its ``g'`` heads, are then
ordered by a second greedy pass, giving ``E`` for ``U' = 1..U``. Cost per greedy step:
``O(n^2 d + out n d)`` (a rank-``d`` update of the residual Gram and of ``W R``; ``d`` the
columns added), about ``U*g + g*U`` steps per layer -- for a 70B layer (n = 8192, 64 query
heads of 128) about 10^12 float64 operations per layer: a minute or two on a CPU core, far
less on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("group", "query", "both")
_F64 = torch.float64


@dataclass(frozen=True)
class AttnOption:
    """One way to prune a layer's attention: ``units`` kept KV groups with ``group`` query
    heads each; ``heads`` the kept query heads (``unit * dense_group + j``, sorted), ``error``
    the fold's calibration error energy ``E`` (squared Frobenius norm)."""

    units: int
    group: int
    heads: tuple[int, ...]
    error: float

    def kept_units(self, dense_group: int) -> list[int]:
        return sorted({h // dense_group for h in self.heads})


def _pinv_sqrt(S: torch.Tensor, tol: float) -> torch.Tensor:
    """``V diag(1/sqrt(lam))`` over the eigenvalues of the symmetric PSD ``S`` above ``tol``:
    ``P P^T = S^+``; (m, rank)."""
    lam, V = torch.linalg.eigh(0.5 * (S + S.T))
    keep = lam > tol
    return V[:, keep] / lam[keep].sqrt()


def greedy_blocks(G: torch.Tensor, W: torch.Tensor, candidates: list[torch.Tensor],
                  steps: int | None = None) -> tuple[list[int], list[float]]:
    """Greedy forward selection of column sets for the least-squares fold of ``W`` (out, n).

    ``G`` (n, n) Gram of the projection's input, ``candidates`` disjoint column index sets.
    Each step adds the candidate that lowers ``E = tr(W R W^T)`` most (ties: the lower
    index). Returns the order (``steps`` candidates, default all) and ``E`` before the first
    and after every step ((steps+1,), float64 energies, nonincreasing)."""
    if G.ndim != 2 or G.shape[0] != G.shape[1] or W.ndim != 2 or W.shape[1] != G.shape[0]:
        raise ValueError(f"G must be (n, n) and W (out, n); got {tuple(G.shape)} and {tuple(W.shape)}")
    steps = len(candidates) if steps is None else steps
    if not 0 <= steps <= len(candidates):
        raise ValueError(f"steps={steps} must be in [0, {len(candidates)}]")
    R = G.detach().to(_F64).clone()
    R = 0.5 * (R + R.T)
    Wd = W.detach().to(R.device, _F64)
    tol = G.shape[0] * float(torch.finfo(_F64).eps) * float(R.diagonal().abs().max().clamp(min=1e-300))
    cands = [c.to(R.device).long() for c in candidates]
    WR = Wd @ R  # (out, n)
    errors = [float((WR * Wd).sum())]
    order: list[int] = []
    left = list(range(len(cands)))
    for _ in range(steps):
        best, best_gain, best_p = left[0], -1.0, None
        for i in left:
            c = cands[i]
            P = _pinv_sqrt(R[c][:, c], tol)  # (|c|, rank)
            gain = float((WR[:, c] @ P).pow(2).sum())
            if gain > best_gain:
                best, best_gain, best_p = i, gain, P
        c = cands[best]
        F = R[:, c] @ best_p  # (n, rank): R -= F F^T projects the candidate's columns out
        R = R - F @ F.T  # O(n^2 rank)
        WR = WR - (Wd @ F) @ F.T  # = W R, without an (out, n) x (n, n) product
        errors.append(max(float((WR * Wd).sum()), 0.0))
        order.append(best)
        left.remove(best)
    for i in range(1, len(errors)):  # exact arithmetic is nonincreasing; rounding is not
        errors[i] = min(errors[i], errors[i - 1])
    return order, errors


def fold_error(G: torch.Tensor, W: torch.Tensor, cols: torch.Tensor) -> float:
    """``E`` of the least-squares fold of ``W`` onto the columns ``cols`` (one candidate)."""
    return greedy_blocks(G, W, [torch.as_tensor(cols).long()], 1)[1][1]


def head_ranking(G: torch.Tensor, W: torch.Tensor, units: int, group: int, head_dim: int) -> torch.Tensor:
    """(units, group): the query heads of every group (indices ``j`` inside the group), best
    first, by one greedy pass over all ``units*group`` heads."""
    heads = units * group
    cols = [torch.arange(h * head_dim, (h + 1) * head_dim) for h in range(heads)]
    order, _ = greedy_blocks(G, W, cols)
    pos = torch.empty(heads, dtype=torch.long)
    pos[torch.tensor(order, dtype=torch.long)] = torch.arange(heads)
    return torch.sort(pos.reshape(units, group), dim=1, stable=True).indices


def attention_options(G: torch.Tensor, W: torch.Tensor, units: int, group: int, head_dim: int, mode: str,
                      group_curve: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[AttnOption]:
    """Every option of ``mode`` for one layer: ``"group"`` (``U' = 0..U`` whole groups),
    ``"query"`` (all ``U`` groups, ``g' = 1..g``), ``"both"`` (``U' = 1..U`` times
    ``g' = 1..g``, plus no attention at all). ``group_curve`` = (order (U,), errors (U+1,)
    energies) of the plugin's own whole-group decomposition: used for ``g' = g`` so that
    ``"both"`` offers exactly the options of ``"group"`` and more. Multi-head attention
    (``group == 1``) has no finer unit: ``"query"`` and ``"both"`` give the group options."""
    if mode not in MODES:
        raise ValueError(f"attention units {mode!r} is not one of {MODES}")
    if G.shape[0] != units * group * head_dim:
        raise ValueError(f"Gram of {G.shape[0]} columns for {units} units x {group} heads x {head_dim}")
    if group == 1 and mode != "group":
        mode = "group"
    opts: list[AttnOption] = []
    unit_cols = lambda u, js: [u * group + int(j) for j in js]  # noqa: E731
    if mode in ("group", "both"):
        if group_curve is None:
            cands = [torch.arange(u * group * head_dim, (u + 1) * group * head_dim) for u in range(units)]
            order, errors = greedy_blocks(G, W, cands)
        else:
            order, errors = [int(u) for u in group_curve[0]], [float(e) for e in group_curve[1]]
        for t in range(units + 1):
            heads = tuple(sorted(h for u in order[:t] for h in unit_cols(u, range(group))))
            opts.append(AttnOption(t, group if t else 0, heads, errors[t]))
    if mode == "group":
        return opts
    rank = head_ranking(G, W, units, group, head_dim)  # (units, group)
    for gp in range(1, group):
        cols = [torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in unit_cols(u, rank[u, :gp])])
                for u in range(units)]
        if mode == "query":
            _, errors = greedy_blocks(G, W, [torch.cat(cols)], 1)
            heads = tuple(sorted(h for u in range(units) for h in unit_cols(u, rank[u, :gp])))
            opts.append(AttnOption(units, gp, heads, errors[1]))
            continue
        order, errors = greedy_blocks(G, W, cols)
        for t in range(1, units + 1):
            heads = tuple(sorted(h for u in order[:t] for h in unit_cols(u, rank[u, :gp])))
            opts.append(AttnOption(t, gp, heads, errors[t]))
    if mode == "query":
        opts.append(AttnOption(units, group, tuple(range(units * group)), 0.0))
    return opts


def option_macs(opt: AttnOption, kv: int, query_head: int) -> int:
    """MACs of an option from the cost model's per-unit (K, V) and per-query-head parts."""
    return opt.units * kv + opt.units * opt.group * query_head


def choose_heads(G: torch.Tensor, W: torch.Tensor, units: int, group: int, head_dim: int, keep_units: int,
                 per_group: int) -> list[int]:
    """The query heads (``unit * group + j``, sorted) of the ``keep_units`` x ``per_group``
    option, chosen as in :func:`attention_options` (used to re-pick at the selected widths)."""
    if not (0 <= keep_units <= units and 1 <= per_group <= group):
        raise ValueError(f"cannot keep {keep_units} of {units} groups with {per_group} of {group} query heads each")
    rank = head_ranking(G, W, units, group, head_dim) if per_group < group else \
        torch.arange(group).expand(units, group)
    heads = [[u * group + int(j) for j in rank[u, :per_group]] for u in range(units)]
    cols = [torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in hs]) for hs in heads]
    order = list(range(units)) if keep_units == units else greedy_blocks(G, W, cols, keep_units)[0]
    return sorted(h for u in order[:keep_units] for h in heads[u])
