"""Running a method: score -> select -> refine -> correct -> remove -> transform.

:func:`prune` is the single entry point used by the harness, the tests and users. It never
looks at a method's name: it resolves the method's recipe through the registry and calls
the stage hooks by stage name; the plugin that declared a stage answers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import nn

from .arch.base import Adapter
from .arch.families import get_adapter
from .calibration import CalibrationData
from .cost import CostModel, check_budget
from .registry import Registry
from .spec import MethodSpec
from .surgery import apply_selection
from .units import Selection, TransformResult, UnitScores


@dataclass
class PruneContext:
    """Everything a stage may use. Stages may write figures into ``report``."""

    model: nn.Module
    adapter: Adapter | None  # None only for transform-only recipes on architectures without an adapter
    cost: CostModel | None
    budget: float
    calib: CalibrationData | None
    device: torch.device
    seed: int
    pm: pluggy.PluginManager
    progress: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    #: objects a stage hands to a later stage of the same prune (e.g. a teacher mask); not recorded
    scratch: dict[str, Any] = field(default_factory=dict)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A seeded CPU generator (stages draw their randomness from it)."""
        return torch.Generator().manual_seed(self.seed + offset)


@dataclass
class PruneResult:
    model: nn.Module
    selection: Selection | None
    report: dict[str, Any]
    compressed: dict[str, dict[str, Any]]  # per transform stage: tensors + meta, for saving
    scores: UnitScores | None = None  # the score stage's output (reusable for other budgets)


def _call(hook: Any, kind: str, name: str, **kwargs: Any) -> Any:
    out = hook(name=name, **kwargs)
    if out is None:
        raise RuntimeError(f"{kind} stage {name!r} is declared but no registered plugin implements it")
    return out


def _check_budget(ctx: PruneContext, sel: Selection, after: str) -> None:
    frac = ctx.cost.fraction(sel)
    if frac > ctx.budget + 1e-9:
        raise RuntimeError(f"{after} kept {frac:.4f} of the FLOPs, over the budget {ctx.budget}")


def prune(model: nn.Module, method: str | MethodSpec, budget: float = 1.0, *,
          calib: CalibrationData | None = None, seq_len: int | None = None,
          options: dict[str, Any] | None = None, pm: pluggy.PluginManager | None = None,
          device: str | torch.device | None = None, seed: int = 0, progress: bool = False,
          scores: UnitScores | None = None, copy: bool = False) -> PruneResult:
    """Compress ``model`` with ``method`` (a registered name or a recipe string).

    copy: False (the default) compresses ``model`` itself, in place: no second copy of the
        weights, which is what a 7B-70B model needs, but a stage that fails half-way leaves
        ``model`` partly modified. True compresses a deep copy (``result.model``) and leaves
        ``model`` untouched, whether the method succeeds or fails.

    budget: fraction of the transformer layers' FLOPs to keep, in (0, 1].
    seq_len: sequence length of the cost model (default: the calibration data's, else 128).
    options: method options (see ``harness plugins --options``); unknown names are an error.
    scores: the output of this recipe's score stage from an earlier call on an identical
        dense model with the same calibration data, seed and score options (``result.scores``);
        the score stage is then skipped. Scores do not depend on the budget (hook contract).
    """
    if copy:
        import copy as copying

        model = copying.deepcopy(model)
    if pm is None:
        from .manager import get_plugin_manager

        pm = get_plugin_manager()
    registry = Registry(pm)
    spec = method if isinstance(method, MethodSpec) else registry.method(method)
    opts = registry.resolve_options(spec, options or {})
    budget = check_budget(budget)
    needs = registry.needs(spec.recipe)
    if needs["calibration"] and calib is None:
        raise ValueError(f"method {spec.name!r} needs calibration data; none was given")
    if needs["labels"] and not calib.has_labels:  # type: ignore[union-attr]
        raise ValueError(f"method {spec.name!r} needs labelled calibration data; the batches from "
                         f"{calib.source!r} have no 'labels'")  # type: ignore[union-attr]
    recipe = spec.recipe
    try:
        adapter = get_adapter(model)
    except ValueError:
        if recipe.prunes:
            raise
        adapter = None  # e.g. quantizing an encoder-decoder: transforms walk the modules themselves
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    model.eval()
    seq = seq_len or (calib.seq_len if calib is not None else 128)
    cost = CostModel(adapter, seq) if adapter is not None else None
    ctx = PruneContext(model, adapter, cost, budget, calib, dev, seed, pm, progress)
    torch.manual_seed(seed)
    hook = pm.hook
    counts = (adapter.head_counts(), adapter.neuron_counts()) if adapter is not None else ([], [])
    params_before = sum(p.numel() for p in model.parameters())
    timings: dict[str, float] = {}
    start = time.perf_counter()
    selection = None
    # a select stage priced in FLOPs is checked here; one with its own budget (latency) checks itself
    flops_budget = recipe.prunes and registry.stage("select", recipe.select).budget == "flops"
    if recipe.prunes:
        t = time.perf_counter()
        if scores is None:
            scores = _call(hook.tshrink_score, "score", recipe.score, ctx=ctx, options=opts)
        else:
            ctx.report["score_reused"] = True
        scores.check(*counts)
        timings[f"score:{recipe.score}"] = time.perf_counter() - t
        t = time.perf_counter()
        selection = _call(hook.tshrink_select, "select", recipe.select, ctx=ctx, scores=scores, options=opts)
        selection.check(*counts)
        if flops_budget:
            _check_budget(ctx, selection, f"select stage {recipe.select!r}")
        timings[f"select:{recipe.select}"] = time.perf_counter() - t
        for name in recipe.refine:
            t = time.perf_counter()
            selection = _call(hook.tshrink_refine, "refine", name, ctx=ctx, scores=scores, selection=selection, options=opts)
            selection.check(*counts)
            if flops_budget:
                _check_budget(ctx, selection, f"refine stage {name!r}")
            timings[f"refine:{name}"] = time.perf_counter() - t
        for name in recipe.correct:
            t = time.perf_counter()
            widths = selection.widths()
            selection = _call(hook.tshrink_correct, "correct", name, ctx=ctx, selection=selection, options=opts)
            selection.check(*counts)
            new = selection.widths()
            if any(a > b for k in widths for a, b in zip(new[k], widths[k])):
                raise RuntimeError(f"correct stage {name!r} widened a layer: {widths} -> {new}")
            timings[f"correct:{name}"] = time.perf_counter() - t
        t = time.perf_counter()
        apply_selection(adapter, selection)
        timings["remove"] = time.perf_counter() - t
    compressed: dict[str, dict[str, Any]] = {}
    transform_reports = {}
    for name in recipe.transform:
        t = time.perf_counter()
        res: TransformResult = _call(hook.tshrink_transform, "transform", name, ctx=ctx, options=opts)
        if res.tensors:
            compressed[name] = {"tensors": res.tensors, "meta": res.meta}
        transform_reports[name] = res.report
        timings[f"transform:{name}"] = time.perf_counter() - t
    dense_macs = cost.macs() if cost is not None else None
    kept_macs = cost.macs(adapter.widths()) if cost is not None else None
    report = {
        "method": spec.name,
        "recipe": str(recipe),
        "options": opts,
        "budget": budget,
        "seq_len": seq,
        "flops_convention": "analytic MACs of the transformer layers, 1 multiply-add = 1 FLOP, one sequence",
        "layer_macs_before": dense_macs,
        "layer_macs_after": kept_macs,
        "flops_kept": kept_macs / dense_macs if cost is not None else 1.0,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "widths_before": {"heads": counts[0], "neurons": counts[1]},
        "widths_after": adapter.widths() if adapter is not None else None,
        "calibration": calib.describe() if calib is not None else None,
        "transforms": transform_reports,
        "stages": ctx.report,
        "timings_s": timings,
        "time_s": time.perf_counter() - start,
        "device": str(dev),
        "seed": seed,
    }
    return PruneResult(model, selection, report, compressed, scores if recipe.prunes else None)
