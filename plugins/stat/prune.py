"""STAT on a whole model: error curves per layer (score), widths (select), and the
sequential decompose-and-fold pass (correct). Flynn et al., *Shrinking Transformers After
Training* (STAT), arXiv 2406.00061.

Per layer, two activation matrices (real tokens only) are streamed into
:class:`.collect.ColumnStats` while a :class:`tshrink.calibration.LayerStream` runs that
layer (scoring walks the layers with the host's helper :func:`tshrink.stats.layer_stats`) --
memory is bounded by one layer's statistics, never all layers' activations:

* MLP: ``A`` (tokens x neurons), the down projection's input (for a gated MLP the product
  ``act(gate) * up``). Columns are scaled by the norms of the matching down-projection
  columns, and a column ID (pivoted Cholesky of the Gram, or pivoted QR of a sketch) picks
  the neurons.
* Attention: ``X`` (tokens x units*group*head_dim), the output projection's input; a unit
  (head, or KV group under GQA) is a block of ``group*head_dim`` columns. Each block is
  scaled by ``(W_u^T W_u)^{1/2}``, ``W_u`` its output-projection columns, so a block's
  energy is exactly that unit's contribution to the layer output (the block analogue of
  the neuron scaling); heads are then chosen by the greedy block-pivoted decomposition
  (:func:`.idecomp.select_blocks`).

Folding. For kept columns ``K`` the output projection ``W`` (``y = A W^T + b``) is replaced
by the least-squares fit ``W_K' = argmin ||A W^T - A_K W_K'^T||`` computed from the Gram
(:func:`.idecomp.least_squares_fold`, a tiny ridge ``stat_damping`` for rank-deficient
blocks). For the ID's columns this is exactly the paper's fold ``W T^T`` (T is the
least-squares interpolation of the other columns). When the projection has a bias and
``stat_center`` is on, activations are centred first (decomposition and fit) and the mean
of what the removed units produced is folded into the bias.

Error curves. The decompositions' factors give, for every width k, the exact calibration
error ``e[k] = ||A W^T - A_K W_K'^T||_F^2`` of that fold
(:func:`.idecomp.weighted_residuals`). With ``stat_error_norm="stream"`` each layer's
curves are divided by the typical energy of the residual stream entering the layer (token
count x median ``||h_t||^2``, :func:`.collect.stream_energy`), i.e. they measure the
relative perturbation of the stream, which is what the following normalisations see;
attention and MLP curves are in the same units, so one allocator can trade them (see
:mod:`.allocate`).

Numerics. Default (``stat_sketch="none"``): the exact Gram, float64, on the model's
device, and the ID by pivoted Cholesky (LAPACK ``dpstrf`` on the CPU, a blocked torch loop
on a GPU) -- the same pivots and ``R`` as pivoted QR in exact arithmetic (torch has no
pivoted QR), at the price of a squared condition number, irrelevant for the leading pivots
that pruning keeps. With ``stat_sketch="gaussian"|"countsketch"`` a row sketch
``Y = S A`` (s x n) is streamed instead (CountSketch: O(n) per token instead of O(n^2)),
sized by what it is for and never above the exact path's cost: only the correct stage
sketches (it knows the kept width k; s = 2k+10 Gaussian, 4k+10 CountSketch rows), and
only when s < n -- otherwise, and always at the score stage (which needs the error at
every width, i.e. rank n), the exact Gram is kept and the report says why. The neuron ID
of a short sketch is k steps of column-pivoted QR in torch on the statistics' device
(:func:`.idecomp.partial_pivoted_qr`, O(k s n)); the folds read only the kept rows
``Y_K^T Y`` (no n x n matrix); the head selection uses ``Y^T Y`` (n = hidden size).

Robustness. Token rows with NaN/inf are dropped (and reported); a layer whose statistics
are empty or non-finite keeps the incoming selection without any weight change, with a
warning in the report. No module is resized here: the host removes units afterwards.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tshrink.arch.base import Adapter
from tshrink.surgery import write_columns
from tshrink.calibration import CalibrationData, LayerStream
from tshrink.cost import CostModel
from tshrink.masking import soft_masks
from tshrink.progress import Track, note, untracked
from tshrink.stats import layer_stats
from tshrink.units import Selection, UnitScores

from .allocate import allocate_global, allocate_options, allocate_uniform, hull_gains
from .collect import SKETCHES, ColumnStats, stream_energy
from .query_units import MODES as ATTENTION_UNITS, AttnOption, attention_options, choose_heads, option_macs
from .idecomp import (block_columns, id_from_gram, least_squares_fold_rows, partial_pivoted_qr, select_blocks,
                      weighted_residuals)

ERROR_NORMS = ("stream", "none")
SEQUENTIAL = ("sublayer", "layer", "none")
HEAD_RULES = ("block", "trace")
_F64 = torch.float64
_EPS = float(torch.finfo(_F64).eps)


@dataclass(frozen=True)
class StatConfig:
    """The plugin's options, validated (names without the ``stat_`` prefix)."""

    sketch: str = "none"
    sketch_size: int = 0
    center: bool = True
    error_norm: str = "stream"
    sequential: str = "layer"
    repick: bool = True
    damping: float = 1e-6
    head_rule: str = "block"
    attention_units: str = "group"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sketch not in SKETCHES:
            raise ValueError(f"stat_sketch={self.sketch!r} is not one of {SKETCHES}")
        if self.error_norm not in ERROR_NORMS:
            raise ValueError(f"stat_error_norm={self.error_norm!r} is not one of {ERROR_NORMS}")
        if self.sequential not in SEQUENTIAL:
            raise ValueError(f"stat_sequential={self.sequential!r} is not one of {SEQUENTIAL}")
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise ValueError(f"stat_damping={self.damping!r} must be a number >= 0")
        if self.head_rule not in HEAD_RULES:
            raise ValueError(f"stat_head_rule={self.head_rule!r} is not one of {HEAD_RULES}")
        if self.attention_units not in ATTENTION_UNITS:
            raise ValueError(f"stat_attention_units={self.attention_units!r} is not one of {ATTENTION_UNITS}")

    @classmethod
    def from_options(cls, options: dict[str, Any], seed: int = 0) -> "StatConfig":
        d = cls()
        get = lambda name, default: options.get(f"stat_{name}", default)  # noqa: E731
        return cls(get("sketch", d.sketch), int(get("sketch_size", d.sketch_size)), bool(get("center", d.center)),
                   get("error_norm", d.error_norm), str(get("sequential", d.sequential)),
                   bool(get("repick", d.repick)), float(get("damping", d.damping)),
                   str(get("head_rule", d.head_rule)), str(get("attention_units", d.attention_units)), seed)

    def stats(self, n: int, device: torch.device, *, target_rank: int | None = None, seed: int = 0) -> ColumnStats:
        return ColumnStats(n, sketch=self.sketch, size=self.sketch_size, target_rank=target_rank,
                           seed=self.seed + seed, device=device)


# -- scaling and decompositions of one layer -----------------------------------------------
@contextmanager
def _single_thread(t: torch.Tensor) -> Iterator[None]:
    """Run CPU torch ops inside on one thread (no-op for tensors on other devices)."""
    if t.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def unit_scaling(W: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit scales from the output projection ``W`` (out, n), units of ``bs`` columns.

    Returns ``(M, M_pinv)``, each (n/bs, bs, bs): ``M_u = (W_u^T W_u)^{1/2}`` (for ``bs = 1``
    the column norm) and its pseudo-inverse, so ``||X_u M_u||_F = ||X_u W_u^T||_F`` and
    ``(W M^+) M = W``.
    """
    out, n = W.shape
    W64 = W.detach().to(_F64)
    if bs == 1:
        d = W64.norm(dim=0)  # (n,)
        inv = torch.where(d > n * _EPS * d.max().clamp(min=1e-300), 1.0 / d.clamp(min=1e-300), torch.zeros_like(d))
        return d.reshape(n, 1, 1), inv.reshape(n, 1, 1)
    Wb = W64.reshape(out, n // bs, bs).permute(1, 0, 2)  # (nb, out, bs)
    with _single_thread(W64):  # batched small eigh: measured ~100x slower with 2 OpenMP threads
        lam, V = torch.linalg.eigh(Wb.transpose(1, 2) @ Wb)  # (nb, bs), (nb, bs, bs)
    lam = lam.clamp(min=0)
    tol = bs * _EPS * lam.amax(-1, keepdim=True)
    root = lam.sqrt()
    inv = torch.where(lam > tol, 1.0 / root.clamp(min=1e-300), torch.zeros_like(root))
    M = V @ torch.diag_embed(root) @ V.transpose(1, 2)
    Mp = V @ torch.diag_embed(inv) @ V.transpose(1, 2)
    return M, Mp


def block_apply(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``W M`` (out, n) for block-diagonal ``M`` (nb, bs, bs)."""
    nb, bs, _ = M.shape
    W64 = W.detach().to(M.device, _F64).reshape(W.shape[0], nb, bs)
    return torch.einsum("oai,aij->oaj", W64, M.to(_F64)).reshape(W.shape[0], nb * bs)


def neuron_decomposition(stats: ColumnStats, W: torch.Tensor, center: bool,
                         k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivot order (n,) of the scaled column ID of the down-projection input, and the
    error curve (n+1,) ``||A W^T - A_K W_K'^T||_F`` for the first k pivots (float64)."""
    M, Mp = unit_scaling(W, 1)
    M, Mp = M.to(stats.sum.device), Mp.to(stats.sum.device)
    kind, mat = stats.scaled(center, M)
    if kind == "sketch" and k > 0 and mat.shape[0] < mat.shape[1]:  # a short sketch: k pivoted-QR steps, on its device
        pivots, factor = partial_pivoted_qr(mat, k)
        return pivots, weighted_residuals(factor, block_apply(W, Mp))
    d = id_from_gram(mat if kind == "gram" else mat.T @ mat, k)  # the Gram: pivoted Cholesky
    return d.pivots, weighted_residuals(d.factor.to(mat.device), block_apply(W, Mp))


def trace_order(G: torch.Tensor, W: torch.Tensor, bs: int) -> torch.Tensor:
    """Unit order (units,) of the ``trace`` head rule: pivoted Cholesky of the units x units
    matrix ``tr(G_uv) ||W_u||_F ||W_v||_F`` (``G`` (n, n) the unscaled Gram of the output
    projection's input, ``W`` (out, n) that projection, units of ``bs`` columns)."""
    nb = G.shape[0] // bs
    traces = torch.einsum("aibi->ab", G.to(_F64).reshape(nb, bs, nb, bs))  # (units, units)
    w = W.detach().to(G.device, _F64).reshape(W.shape[0], nb, bs).pow(2).sum((0, 2)).sqrt()  # (units,)
    return id_from_gram(traces * w[:, None] * w[None, :], 0).pivots


def head_decomposition(stats: ColumnStats, W: torch.Tensor, bs: int, center: bool,
                       k: int = 0, rule: str = "block") -> tuple[torch.Tensor, torch.Tensor]:
    """Block order (units,) of the scaled output-projection input -- greedy block pivoting
    (``rule="block"``) or :func:`trace_order` (``"trace"``) -- and the error curve (units+1,)
    of the least-squares fold onto the first t units of that order."""
    M, Mp = unit_scaling(W, bs)
    M, Mp = M.to(stats.sum.device), Mp.to(stats.sum.device)
    kind, mat = stats.scaled(center, M)
    G = mat if kind == "gram" else mat.T @ mat
    order = trace_order(stats.gram(center), W, bs) if rule == "trace" else None
    sel = select_blocks(G, bs, k, order=order)
    return sel.order, weighted_residuals(sel.factor, block_apply(W, Mp), sel.ends)


def fold_into(linear: nn.Linear, stats: ColumnStats, cols: torch.Tensor, center: bool, damping: float) -> str | None:
    """Replace ``linear``'s columns ``cols`` by the least-squares fold (and its bias by the
    centred fit's intercept). Returns a reason instead of writing if the result is not finite."""
    center = center and linear.bias is not None
    cols = cols.to(stats.sum.device).long()
    GK, trace = stats.gram_rows(center, cols)  # (|K|, n): no n x n Gram is formed from a sketch
    if not bool(torch.isfinite(GK).all()) or not math.isfinite(trace):
        return "activation statistics are not finite"
    W = linear.weight
    G = GK
    Wk = least_squares_fold_rows(GK, trace, W, cols, damping=damping)  # (out, |K|)
    bias = None
    if center:
        mu = stats.mean  # (n,)
        W64 = W.detach().to(G.device, _F64)
        bias = linear.bias.detach().to(G.device, _F64) + W64 @ mu - Wk.to(G.device, _F64) @ mu[cols]
    if not bool(torch.isfinite(Wk).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
        return "the fitted weights are not finite"
    write_columns(linear, cols, Wk)  # the model's own storage (MoE down projections are views)
    with torch.no_grad():
        if bias is not None:
            linear.bias.copy_(bias.to(linear.bias.device, linear.bias.dtype))
    return None


# -- streaming helpers ---------------------------------------------------------------------
def _pass(stream: LayerStream, captures: list[tuple[nn.Module, ColumnStats | None]], *, advance: bool,
          masks: tuple[list[Any], list[Any]] | None = None) -> None:
    """Run the stream's current layer once (advancing or not) with the given captures."""
    with ExitStack() as stack:
        for module, stats in captures:
            if stats is not None:
                stack.enter_context(stream.capture(module, stats.update))
        if masks is not None:
            stack.enter_context(soft_masks(stream.adapter, *masks))
        if advance:
            stream.advance()
        else:
            stream.run()


def _layer_masks(adapter: Adapter, layer: int, heads: list[int] | None, neurons: list[int] | None,
                 query: list[int] | None = None):
    n = adapter.num_layers
    hm: list[torch.Tensor | None] = [None] * n
    nm: list[torch.Tensor | None] = [None] * n
    qm: list[torch.Tensor | None] = [None] * n
    if heads is not None:
        hm[layer] = torch.zeros(adapter.attn(layer).units)
        hm[layer][heads] = 1.0
    if query is not None:  # query-head units (GQA): one value per query head
        a = adapter.attn(layer)
        qm[layer] = torch.zeros(a.units * a.group)
        qm[layer][query] = 1.0
    if neurons is not None:
        nm[layer] = torch.zeros(adapter.mlp(layer).neurons)
        nm[layer][neurons] = 1.0
    return hm, nm, qm


def _dropped(warn: Callable[[str], None], layer: int, what: str, stats: ColumnStats) -> None:
    if stats.dropped:
        warn(f"layer {layer} {what}: dropped {stats.dropped} of {stats.dropped + stats.count} token rows "
             "with NaN/inf activations")


# -- score ---------------------------------------------------------------------------------
def stat_scores(adapter: Adapter, calib: CalibrationData, cfg: StatConfig, *, device: torch.device,
                report: dict[str, Any] | None = None, track: Track = untracked,
                stream_options: dict[str, Any] | None = None, state: Any = None) -> UnitScores:
    """Error curves of every layer on the dense model and the unit scores derived from them.

    ``state`` (``ctx.layer_state()``): each layer's curves are saved as it finishes and layers
    saved by an interrupted run are restored instead of recomputed (their forward still runs).

    A unit's score is its hull gain (:func:`.allocate.hull_gains`) at its pivot position:
    the (convexified) error reduction it brings, in the curves' units. ``extra["stat"]``
    holds, per layer, ``{"order": (n,), "errors": (n+1,)}`` for heads and neurons (``None``
    where not computed) -- what ``stat-allocate`` consumes.
    """
    report = report if report is not None else {}
    warnings: list[str] = report.setdefault("warnings", [])
    if state is not None and cfg.attention_units != "group":
        state = None  # the per-layer state holds no query-head options: such a run restarts from layer 0
        report["resume"] = "off: the saved layer state does not hold query-head options"
    out: dict[str, list[Any]] = {"heads": [], "neurons": []}
    scores: dict[str, list[torch.Tensor]] = {"heads": [], "neurons": []}
    # per layer, one forward of the dense model; ColumnStats (Gram or sketch) per projection
    accumulate = lambda kind, layer, units, width: cfg.stats(  # noqa: E731
        units * width, device, seed=2 * layer + (kind == "neurons"))
    energy_of = stream_energy if cfg.error_norm == "stream" else None
    per_layer: dict[int, dict[str, tuple[Any, torch.Tensor]]] = {}  # layer -> kind -> (curve or None, scores)
    for layer in range(adapter.num_layers):
        saved = state.load(layer) if state is not None else None
        if saved is not None:
            tensors, meta = saved
            per_layer[layer] = {kind: (({"order": tensors[f"{kind}.order"], "errors": tensors[f"{kind}.errors"]}
                                        if meta[kind] else None), tensors[f"{kind}.scores"])
                                for kind in ("heads", "neurons")}
            warnings.extend(meta.get("warnings", []))
    if per_layer:
        report["resumed_layers"] = sorted(per_layer)
    for st in layer_stats(adapter, calib, device=device, accumulator=accumulate, inputs=energy_of, track=track,
                          stream_options=stream_options, skip=per_layer.__contains__):
        layer, a, m = st.layer, st.attn, st.mlp
        done: dict[str, tuple[Any, torch.Tensor]] = {}
        before = len(warnings)
        energy = st.inputs if energy_of is not None and st.inputs > 0 else 1.0
        for kind, stats, n in (("heads", st.heads, a.units), ("neurons", st.neurons, m.neurons)):
            if stats is None:
                done[kind] = (None, torch.zeros(n))
                continue
            _dropped(warnings.append, layer, kind, stats)
            if stats.count == 0:
                raise ValueError(f"layer {layer}: no calibration token has finite {kind} activations; "
                                 "check the model and the calibration data")
            lin = a.o if kind == "heads" else m.out
            center = cfg.center and lin.bias is not None
            if kind == "heads":
                order, errors = head_decomposition(stats, lin.weight, st.head_width, center, rule=cfg.head_rule)
            else:
                order, errors = neuron_decomposition(stats, lin.weight, center)
            curve = (errors.pow(2) / energy).cpu()  # (n+1,)
            s = torch.zeros(n, dtype=_F64)
            s[order.cpu()] = hull_gains(curve)
            done[kind] = ({"order": order.cpu(), "errors": curve}, s.float())
            if kind == "heads" and cfg.attention_units != "group":
                # every (kept groups, query heads per group) option with its fold error, same units
                opts = attention_options(stats.gram(center), lin.weight, a.units, a.group, a.head_dim,
                                         cfg.attention_units, (order.cpu(), errors.pow(2).cpu()))
                done[kind][0]["options"] = [AttnOption(o.units, o.group, o.heads, o.error / energy) for o in opts]
        per_layer[layer] = done
        if state is not None:
            tensors = {f"{k}.scores": v[1] for k, v in done.items()}
            for k, (curve, _) in done.items():
                if curve is not None:
                    tensors[f"{k}.order"], tensors[f"{k}.errors"] = curve["order"], curve["errors"]
            state.save(layer, tensors, {"heads": done["heads"][0] is not None,
                                        "neurons": done["neurons"][0] is not None, "warnings": warnings[before:]})
    for layer in range(adapter.num_layers):
        for kind in ("heads", "neurons"):
            curve, s = per_layer[layer][kind]
            out[kind].append(curve)
            scores[kind].append(s)
    report["error_norm"] = cfg.error_norm
    report["route"] = "gram+pivoted-cholesky"
    report["attention_units"] = cfg.attention_units
    if cfg.sketch != "none":
        report["sketch_note"] = (f"stat_sketch={cfg.sketch!r} is used at the correct stage only: scoring needs the "
                                 "error at every width, for which a sketch costs more than the exact Gram")
    return UnitScores(scores["heads"], scores["neurons"], extra={"stat": out})


# -- select --------------------------------------------------------------------------------
def stat_allocate(scores: UnitScores, cost: CostModel, budget: float, *, allocation: str = "global",
                  prune_heads: bool = True, min_width: float = 0.0, attention_units: str = "group",
                  report: dict[str, Any] | None = None) -> Selection:
    """Widths per layer and kind from the error curves of ``stat_scores``; each layer keeps
    the prefix of its pivot order. ``prune_heads=False`` keeps every attention unit unless
    the budget cannot be met that way (then heads are allocated too, with a warning).
    ``min_width`` (global allocation): every layer keeps at least ``floor(min_width * n)`` of
    its n attention units and of its n MLP neurons."""
    if not (isinstance(min_width, (int, float)) and 0.0 <= min_width <= 1.0):
        raise ValueError(f"stat_min_width={min_width!r} must be a fraction in [0, 1]")
    report = report if report is not None else {}
    if allocation not in ("global", "uniform"):
        raise ValueError(f"stat_allocation={allocation!r} is not one of ('global', 'uniform')")
    extra = scores.extra.get("stat")
    if extra is None:
        raise ValueError("select stage 'stat-allocate' needs the error curves of score stage 'stat' "
                         "(use score=stat in the recipe)")
    heads, neurons = extra["heads"], extra["neurons"]
    if attention_units not in ATTENTION_UNITS:
        raise ValueError(f"stat_attention_units={attention_units!r} is not one of {ATTENTION_UNITS}")
    if attention_units != "group":
        if allocation != "global":
            raise ValueError(f"stat_attention_units={attention_units!r} needs stat_allocation='global' "
                             "(the uniform allocation has no query-head units)")
        if any(h is not None and "options" not in h for h in heads):
            raise ValueError(f"stat_attention_units={attention_units!r} at the select stage needs the score stage "
                             "'stat' run with the same stat_attention_units (its scores have no query-head options)")
        report["attention_units"] = attention_units
        return _allocate_options(scores, cost, budget, prune_heads, min_width, report)
    fixed = sum(c.fixed for c in cost.layers)
    allowed = cost.budget_macs(budget) - fixed
    head_counts = [s.numel() for s in scores.heads]
    if not prune_heads:
        attn = sum(n * c.head for n, c in zip(head_counts, cost.layers))
        if allowed - attn < 0:
            report.setdefault("warnings", []).append(
                f"budget {budget} is below the cost of the unpruned attention ({(attn + fixed) / cost.macs():.3f} "
                "of the FLOPs): attention units are pruned as well")
            prune_heads = True
        else:
            allowed -= attn
    curves, unit_macs, sizes = [], [], []
    for layer, c in enumerate(cost.layers):
        for curve, macs in ((heads[layer] if prune_heads else None, c.head), (neurons[layer], c.neuron)):
            curves.append(None if curve is None else curve["errors"])
            sizes.append(None if curve is None else curve["order"].numel())
            unit_macs.append(macs)
    if allocation == "global":
        floors = [0 if n is None else int(min_width * n) for n in sizes]
        widths = allocate_global(curves, unit_macs, allowed, floors)
    else:
        widths = allocate_uniform(sizes, unit_macs, allowed)
    sel_heads, sel_neurons = [], []
    for layer in range(len(cost.layers)):
        wh, wn = widths[2 * layer], widths[2 * layer + 1]
        sel_heads.append(list(range(head_counts[layer])) if wh is None else heads[layer]["order"][:wh].tolist())
        sel_neurons.append(list(range(scores.neurons[layer].numel())) if wn is None
                           else neurons[layer]["order"][:wn].tolist())
    sel = Selection(sel_heads, sel_neurons)
    kept = [float(c[w]) for c, w in zip(curves, widths) if c is not None and w is not None]
    report["estimated_error"] = sum(kept)
    return sel


def _allocate_options(scores: UnitScores, cost: CostModel, budget: float, prune_heads: bool, min_width: float,
                      report: dict[str, Any]) -> Selection:
    """Global allocation over each layer's attention options (kept groups x query heads per
    group, :mod:`.query_units`) and its neuron curve, by :func:`.allocate.allocate_options`."""
    heads, neurons = scores.extra["stat"]["heads"], scores.extra["stat"]["neurons"]
    allowed = cost.budget_macs(budget) - sum(c.fixed for c in cost.layers)
    groups = cost.groups

    def menus(prune_attention: bool) -> tuple[list[list[tuple[float, float]]], list[list[Any]]]:
        out, labels = [], []
        for layer, c in enumerate(cost.layers):
            h, units = heads[layer], scores.heads[layer].numel()
            if h is None or not prune_attention:
                att = [AttnOption(units, groups[layer], tuple(range(units * groups[layer])), 0.0)]
            else:
                floor = int(min_width * units)
                att = [o for o in h["options"] if o.units >= floor]
            out.append([(float(option_macs(o, c.kv, c.query_head)), o.error) for o in att])
            labels.append(att)
            n, curve = scores.neurons[layer].numel(), neurons[layer]
            ks = [n] if curve is None else list(range(min(int(min_width * n), max(n - 1, 0)), n + 1))
            out.append([(float(k * c.neuron), 0.0 if curve is None else float(curve["errors"][k])) for k in ks])
            labels.append(ks)
        return out, labels

    m, labels = menus(prune_heads)
    try:
        chosen = allocate_options(m, allowed)
    except ValueError:
        if prune_heads:
            raise
        report.setdefault("warnings", []).append(
            f"budget {budget} is below the cost of the unpruned attention: attention units are pruned as well")
        m, labels = menus(True)
        chosen = allocate_options(m, allowed)
    sel_heads, sel_neurons, query = [], [], []
    estimated = 0.0
    for layer in range(len(cost.layers)):
        opt: AttnOption = labels[2 * layer][chosen[2 * layer]]
        k = labels[2 * layer + 1][chosen[2 * layer + 1]]
        estimated += m[2 * layer][chosen[2 * layer]][1] + m[2 * layer + 1][chosen[2 * layer + 1]][1]
        g = groups[layer]
        sel_heads.append(opt.kept_units(g) if opt.units else [])
        query.append(list(opt.heads) if opt.units and opt.group < g else None)
        curve = neurons[layer]
        sel_neurons.append(list(range(k)) if curve is None else curve["order"][:k].tolist())
    report["estimated_error"] = estimated
    report["attention"] = [{"units": len(h), "group": len(q) // max(len(h), 1) if q is not None else groups[i]}
                           for i, (h, q) in enumerate(zip(sel_heads, query))]
    return Selection(sel_heads, sel_neurons, query if any(q is not None for q in query) else None)


# -- correct -------------------------------------------------------------------------------
def stat_correct(adapter: Adapter, calib: CalibrationData, selection: Selection, cfg: StatConfig, *,
                 device: torch.device, report: dict[str, Any] | None = None,
                 track: Track = untracked, stream_options: dict[str, Any] | None = None,
                 state: Any = None) -> Selection:
    """Layer by layer: re-decompose at the selection's widths (``cfg.repick``; otherwise keep
    its indices), fold the least-squares correction into the output projections, and run
    the pruned layer so the next one calibrates on pruned inputs (``cfg.sequential``:
    ``"sublayer"`` also re-runs a layer whose heads were pruned so that its MLP sees the
    pruned attention -- up to 3 passes per layer; ``"layer"``: MLP statistics from the same
    pass as the attention's -- 2 passes; ``"none"``: all statistics from the dense model --
    1 pass). Returns the selection to remove (same widths).

    ``state`` (``ctx.layer_state(...)``): as each layer finishes, its kept units and the folded
    columns (and biases) of its output / down projection are saved; a rerun restores the layers an
    interrupted run finished (then runs their advancing pass only) and continues after them."""
    report = report if report is not None else {}
    warnings: list[str] = report.setdefault("warnings", [])
    layers_report: list[dict[str, Any]] = report.setdefault("layers", [])
    stream = LayerStream(adapter, calib, **(stream_options or {"device": device}))
    L = adapter.num_layers
    if state is not None and (selection.query_heads is not None
                              or any(adapter.experts(i) is not None for i in range(L))):
        state = None  # the saved layer state holds neither query heads nor expert-view writes
        report["resume"] = "off: query-head units or mixture-of-experts layers (not in the saved layer state)"
    new_heads = [list(h) for h in selection.heads]
    new_neurons = [list(n) for n in selection.neurons]
    given_query = selection.query_heads or [None] * L
    new_query: list[list[int] | None] = [None if q is None else list(q) for q in given_query]
    bar = track(range(L), desc="layers")
    restored: list[int] = []
    for layer in bar:
        a, m = adapter.attn(layer), adapter.mlp(layer)
        saved = state.load(layer) if state is not None else None
        if saved is not None:
            note(bar, f"layer {layer}: restored")
            _restore_layer(stream, adapter, layer, saved, cfg, new_heads, new_neurons, layers_report, warnings,
                           last=layer == L - 1)
            restored.append(layer)
            continue
        before = len(warnings)
        bs = a.head_dim * a.group
        kh, kn = len(selection.heads[layer]), len(selection.neurons[layer])
        q = given_query[layer]
        do_att, do_mlp = a.units > 0 and (kh < a.units or q is not None), m.neurons > 0 and kn < m.neurons
        last = layer == L - 1
        att = cfg.stats(a.o.in_features, device, target_rank=kh * bs, seed=2 * layer) if do_att else None
        mlp = cfg.stats(m.neurons, device, target_rank=kn, seed=2 * layer + 1) if do_mlp else None
        info: dict[str, Any] = {"layer": layer, "heads": kh, "neurons": kn}
        for what, st in (("attn", att), ("mlp", mlp)):
            if st is not None:
                info[f"{what}_route"] = st.route + (f" ({st.note})" if st.note else "")
        passes = 1 if cfg.sequential == "none" else (int(do_att or do_mlp) + int(not last)
                                                       + int(cfg.sequential == "sublayer" and do_att and do_mlp))
        if cfg.sequential == "none":  # statistics of the dense model: one pass per layer
            note(bar, f"layer {layer} pass 1/1 (statistics)")
            _pass(stream, [(a.o, att), (m.out, mlp)], advance=not last)
        elif do_att or do_mlp:
            within = cfg.sequential == "sublayer" and do_att
            note(bar, f"layer {layer} pass 1/{passes} (statistics)")
            _pass(stream, [(a.o, att), (m.out, None if within else mlp)], advance=False)
        if do_att and q is not None:
            new_heads[layer], new_query[layer] = _correct_query_heads(a, att, selection.heads[layer], q, cfg, info,
                                                                      layer, warnings)
        elif do_att:
            new_heads[layer] = _correct_units(a.o, att, selection.heads[layer], bs, cfg, info, layer, warnings)
        if do_mlp:
            if cfg.sequential == "sublayer" and do_att:  # the MLP sees its pruned, corrected attention
                note(bar, f"layer {layer} pass 2/{passes} (MLP statistics after the pruned attention)")
                _pass(stream, [(m.out, mlp)], advance=False,
                      masks=_layer_masks(adapter, layer, new_heads[layer], None, new_query[layer]))
            moe = adapter.experts(layer) is not None  # re-picking could break equal counts per expert
            if moe:
                info["mlp_repick"] = "off: mixture-of-experts layer keeps the selection's neurons per expert"
            new_neurons[layer] = _correct_units(m.out, mlp, selection.neurons[layer], None, cfg, info, layer,
                                                warnings, repick=cfg.repick and not moe)
        if state is not None:  # before advancing: the saved state is what the advancing pass needs
            state.save(layer, _layer_state(a.o if do_att else None, m.out if do_mlp else None, new_heads[layer],
                                           new_neurons[layer], bs),
                       {"heads": new_heads[layer], "neurons": new_neurons[layer], "do_att": do_att,
                        "do_mlp": do_mlp, "info": info, "warnings": warnings[before:]})
        if cfg.sequential != "none" and not last:
            note(bar, f"layer {layer} pass {passes}/{passes} (pruned layer, inputs of the next)")
            masks = _layer_masks(adapter, layer, new_heads[layer] if do_att else None,
                                 new_neurons[layer] if do_mlp else None, new_query[layer] if do_att else None)
            _pass(stream, [], advance=True, masks=masks)
        layers_report.append(info)
    stream.release()
    if restored:
        report["resumed_layers"] = restored
    return Selection(new_heads, new_neurons, new_query if any(q is not None for q in new_query) else None)


def _correct_query_heads(a: Any, stats: ColumnStats, given: list[int], query: list[int], cfg: StatConfig,
                         info: dict[str, Any], layer: int, warnings: list[str]) -> tuple[list[int], list[int]]:
    """Query-head units: re-pick (``cfg.repick``) ``len(given)`` groups with the selection's
    ``g'`` query heads each by :func:`.query_units.choose_heads` on this layer's statistics,
    and fold the least-squares correction over the kept query heads' columns into the
    output projection. Returns (kept groups, kept query heads)."""
    if not _usable(stats, layer, "attention", warnings):
        return list(given), list(query)
    center = cfg.center and a.o.bias is not None
    per_group = len(query) // max(len(given), 1)
    heads = list(query)
    if cfg.repick:
        heads = choose_heads(stats.gram(center), a.o.weight, a.units, a.group, a.head_dim, len(given), per_group)
    info["query_heads_per_group"] = per_group
    why = fold_into(a.o, stats, block_columns(torch.as_tensor(heads, dtype=torch.long), a.head_dim), center,
                    cfg.damping)
    if why is not None:
        warnings.append(f"layer {layer} attention: {why}; kept the incoming selection without correction")
        return list(given), list(query)
    return sorted({h // a.group for h in heads}), sorted(heads)


def _layer_state(o: nn.Linear | None, out: nn.Linear | None, heads: list[int], neurons: list[int],
                 bs: int) -> dict[str, torch.Tensor]:
    """What a finished layer's correction wrote: the kept columns of the folded projections
    (the others are removed afterwards) and their biases."""
    tensors: dict[str, torch.Tensor] = {}
    for name, lin, cols in (("o", o, block_columns(torch.as_tensor(heads, dtype=torch.long), bs) if o else None),
                            ("down", out, torch.as_tensor(neurons, dtype=torch.long))):
        if lin is None:
            continue
        tensors[f"{name}.cols"] = cols
        tensors[f"{name}.weight"] = lin.weight.detach()[:, cols.to(lin.weight.device)]
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach()
    return tensors


def _restore_layer(stream: LayerStream, adapter: Adapter, layer: int, saved: Any, cfg: StatConfig,
                   new_heads: list[list[int]], new_neurons: list[list[int]], layers_report: list[dict[str, Any]],
                   warnings: list[str], *, last: bool) -> None:
    """A layer an interrupted run finished: its weights and units back, then the same advancing pass
    (``sequential="none"``: the dense layer's pass, before the weights change)."""
    tensors, meta = saved
    a, m = adapter.attn(layer), adapter.mlp(layer)
    if cfg.sequential == "none" and not last:
        _pass(stream, [], advance=True)
    with torch.no_grad():
        for name, lin in (("o", a.o), ("down", m.out)):
            if f"{name}.weight" in tensors:
                cols = tensors[f"{name}.cols"].to(lin.weight.device)
                lin.weight[:, cols] = tensors[f"{name}.weight"].to(lin.weight.device, lin.weight.dtype)
                if f"{name}.bias" in tensors:
                    lin.bias.copy_(tensors[f"{name}.bias"].to(lin.bias.device, lin.bias.dtype))
    new_heads[layer], new_neurons[layer] = list(meta["heads"]), list(meta["neurons"])
    warnings.extend(meta.get("warnings", []))
    layers_report.append(dict(meta["info"], resumed=True))
    if cfg.sequential != "none" and not last:
        masks = _layer_masks(adapter, layer, new_heads[layer] if meta["do_att"] else None,
                             new_neurons[layer] if meta["do_mlp"] else None)
        _pass(stream, [], advance=True, masks=masks)


def _usable(stats: ColumnStats, layer: int, what: str, warnings: list[str]) -> bool:
    _dropped(warnings.append, layer, what, stats)
    if stats.count == 0:
        warnings.append(f"layer {layer} {what}: no finite calibration activations; kept the incoming "
                        "selection without correction")
        return False
    return True


def _correct_units(linear: nn.Linear, stats: ColumnStats, given: list[int], bs: int | None, cfg: StatConfig,
                   info: dict[str, Any], layer: int, warnings: list[str], repick: bool | None = None) -> list[int]:
    """Re-pick (``cfg.repick``) and fold one projection: attention units of ``bs`` columns
    each (the output projection), or MLP neurons (``bs=None``, the down projection).
    Returns the kept units; on unusable statistics the incoming ``given`` untouched."""
    what = "MLP" if bs is None else "attention"
    if not _usable(stats, layer, what, warnings):
        return list(given)
    center = cfg.center and linear.bias is not None
    keep = torch.as_tensor(given, dtype=torch.long)
    if cfg.repick if repick is None else repick:
        k = len(given)
        order, errors = (neuron_decomposition(stats, linear.weight, center, k) if bs is None
                         else head_decomposition(stats, linear.weight, bs, center, k, cfg.head_rule))
        keep = order[:k].cpu()
        info["mlp_rel_err" if bs is None else "attn_rel_err"] = float(errors[k] / errors[0].clamp(min=1e-300))
    why = fold_into(linear, stats, keep if bs is None else block_columns(keep, bs), center, cfg.damping)
    if why is not None:
        warnings.append(f"layer {layer} {what}: {why}; kept the incoming selection without correction")
        return list(given)
    return sorted(keep.tolist())
