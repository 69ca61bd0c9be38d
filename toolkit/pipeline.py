"""Running a method: score -> select -> refine -> correct -> remove -> transform.

:func:`prune` is the single entry point used by the harness, the tests and users. It never
looks at a method's name: it resolves the method's recipe through the registry and calls
the stage hooks by stage name; the plugin that declared a stage answers.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pluggy
import torch
from torch import nn

from .arch.base import Adapter
from .arch.families import get_adapter
from .calibration import CalibrationData
from .cost import CostModel, check_budget
from . import __version__
from .errors import StageError, stage_error
from .progress import tracked
from .placement import Placement, place_model
from .registry import Registry, Source
from .spec import MethodSpec
from .surgery import apply_selection, check_experts
from .units import Selection, TransformResult, UnitScores

T = TypeVar("T")


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
    layer_offload: bool = False  # layers live on the host; streams move one at a time to ``device``
    hidden_device: torch.device | None = None  # where streams keep hidden states (None: the host)
    #: objects a stage hands to a later stage of the same prune (e.g. a teacher mask); not recorded
    scratch: dict[str, Any] = field(default_factory=dict)
    stage: str = ""  # "kind:name" of the stage running now (set by the host)
    resume: Any = None  # tshrink.resume.ResumeDir of this prune, or None (no per-layer state kept)

    def layer_state(self, key: Any = None) -> Any:
        """Per-layer state of the running stage for resuming after a kill
        (:class:`tshrink.resume.StageState`: ``load(layer)`` / ``save(layer, tensors, meta)``), or
        None when this prune keeps none. ``key``: what the stage's result depends on besides the
        run itself (e.g. the incoming selection)."""
        return None if self.resume is None else self.resume.stage(self.stage, key)

    def stream_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~tshrink.calibration.LayerStream` under this placement."""
        return {"device": self.device, "offload": self.hidden_device or torch.device("cpu"),
                "layer_offload": self.layer_offload}

    def track(self, iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
        """``iterable`` with a progress bar (count, rate, ETA) labelled by the running stage when
        ``progress`` is on (``harness`` sets it), else unchanged. Use it for every long loop:
        ``for layer in ctx.track(range(n), desc="layers"): ...``; pass ``ctx.track`` to helpers
        that take a ``track`` argument (:mod:`tshrink.progress`)."""
        if not self.progress:
            return iterable
        return tracked(iterable, desc=f"{self.stage} {desc}".strip(), total=total)

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


_RETURNS = {"score": UnitScores, "select": Selection, "refine": Selection, "correct": Selection,
            "transform": TransformResult}


class _Stages:
    """Calls each stage on the plugin that declared it; every failure becomes a StageError."""

    def __init__(self, registry: Registry, method: MethodSpec, ctx: PruneContext, opts: dict[str, Any]) -> None:
        self.registry, self.method, self.ctx, self.opts = registry, method, ctx, opts

    def error(self, kind: str, name: str, reason: str, cause: BaseException | None = None) -> StageError:
        src = self.registry.stage_sources.get((kind, name)) or Source("tshrink", "tshrink", __version__)
        return stage_error(reason, cause, kind=kind, stage=name, plugin=src.plugin, package=src.package,
                           version=src.version, method=self.method.name, budget=self.ctx.budget)

    @contextmanager
    def guard(self, kind: str, name: str) -> Iterator[None]:
        """Any exception inside becomes a StageError naming the stage (original as __cause__)."""
        try:
            yield
        except StageError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with its source named
            raise self.error(kind, name, f"{type(err).__name__}: {err}", err) from err

    def __call__(self, kind: str, name: str, check: Callable[[Any], None] | None = None, **kwargs: Any) -> Any:
        want = _RETURNS[kind]
        self.ctx.stage = f"{kind}:{name}"
        try:
            with self.guard(kind, name):
                hook = self.registry.stage_hook(kind, name)
                opts = self.registry.stage_options(kind, name, self.opts)
                out = hook(name=name, ctx=self.ctx, options=opts, **kwargs)
            if out is None:
                raise self.error(kind, name, f"returned None for its own {kind} stage {name!r}: tshrink_{kind} must "
                                             f"return a {want.__name__} when called with name={name!r}")
            if not isinstance(out, want):
                raise self.error(kind, name, f"returned a {type(out).__name__}, expected a {want.__name__}")
            if check is not None:
                try:
                    check(out)
                except Exception as err:  # noqa: BLE001 - e.g. lists where tensors belong
                    detail = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
                    raise self.error(kind, name, f"its {want.__name__} fails the host's check: {detail}") from err
        finally:
            self.ctx.stage = ""
        return out


def resume_dir(path: Any, model: nn.Module, spec: MethodSpec, opts: dict[str, Any], budget: float, seed: int,
               calib: CalibrationData | None) -> Any:
    """The :class:`tshrink.resume.ResumeDir` at ``path`` for this run: keyed by the model's
    fingerprint, method, recipe, options, budget, seed and calibration bytes."""
    import hashlib

    from .resume import ResumeDir, fingerprint, key_of

    h = hashlib.sha256()
    for b in (calib.batches if calib is not None else []):
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    what = {"method": spec.name, "recipe": str(spec.recipe), "options": opts, "budget": budget, "seed": seed,
            "model": fingerprint(model), "calibration": h.hexdigest()[:16]}
    return ResumeDir(path, key_of(what), what)


def _check_budget(ctx: PruneContext, sel: Selection) -> None:
    frac = ctx.cost.fraction(sel)
    if frac > ctx.budget + 1e-9:
        raise ValueError(f"it keeps {frac:.4f} of the FLOPs, over the budget {ctx.budget}")


def prune(model: nn.Module, method: str | MethodSpec, budget: float = 1.0, *,
          calib: CalibrationData | None = None, seq_len: int | None = None,
          options: dict[str, Any] | None = None, pm: pluggy.PluginManager | None = None,
          device: str | torch.device | None = None, seed: int = 0, progress: bool = False,
          scores: UnitScores | None = None, copy: bool = False,
          placement: Placement | None = None, resume: Any = None) -> PruneResult:
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
    placement: where to run (:func:`tshrink.placement.plan_placement`); with layer offload
        only the modules outside the layers go to the device and the stages stream the layers
        one at a time. Overrides ``device``.
    resume: a directory (or :class:`tshrink.resume.ResumeDir`) for per-layer state of the layer-wise
        stages, written atomically as each layer finishes: rerunning the same call after a kill
        continues from the last finished layer with the same result. Removed when the prune
        finishes, unless a ResumeDir is passed (the caller removes it, e.g. after saving).
    """
    if copy:
        import copy as copying

        model = copying.deepcopy(model)
    if pm is None:
        from .manager import get_plugin_manager

        pm = get_plugin_manager()
    registry = Registry(pm)
    registry.warn_problems()
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
    if placement is not None:
        dev = placement.device
        if placement.layer_offload and (adapter is None or needs["gradients"]):
            raise ValueError(f"method {spec.name!r} back-propagates through the whole model, which layer offload "
                             f"cannot stream; it needs ~{placement.need_resident_bytes / 2**30:.2f} GiB on {dev} "
                             f"({placement.available_bytes / 2**30:.2f} GiB available)")
        place_model(model, adapter, placement)
    else:
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        model.to(dev)
    model.eval()
    seq = seq_len or (calib.seq_len if calib is not None else 128)
    cost = CostModel(adapter, seq) if adapter is not None else None
    ctx = PruneContext(model, adapter, cost, budget, calib, dev, seed, pm, progress)
    own_resume = resume is not None and not hasattr(resume, "stage")
    if resume is not None:
        ctx.resume = resume_dir(resume, model, spec, opts, budget, seed, calib) if own_resume else resume
    if placement is not None:
        ctx.layer_offload, ctx.hidden_device = placement.layer_offload, placement.hidden_device
    torch.manual_seed(seed)
    stage = _Stages(registry, spec, ctx, opts)
    counts = (adapter.head_counts(), adapter.neuron_counts()) if adapter is not None else ([], [])
    params_before = sum(p.numel() for p in model.parameters())
    timings: dict[str, float] = {}
    start = time.perf_counter()
    selection = None
    # a select stage priced in FLOPs is checked here
    flops_budget = recipe.prunes and registry.stage("select", recipe.select).budget == "flops"
    if recipe.prunes:
        def fits(sel: Selection) -> None:  # valid indices, within the budget
            sel.check(*counts)
            if flops_budget:  # a select stage with its own budget (latency) checks it itself
                _check_budget(ctx, sel)

        t = time.perf_counter()
        if scores is None:
            scores = stage("score", recipe.score, check=lambda s: s.check(*counts))
        else:
            ctx.report["score_reused"] = True
            with stage.guard("score", recipe.score):
                scores.check(*counts)
        timings[f"score:{recipe.score}"] = time.perf_counter() - t
        experts = [adapter.experts(layer) for layer in range(adapter.num_layers)]

        def per_expert(sel: Selection, kind: str, name: str) -> Selection:
            """Mixture-of-experts layers: the same count in every expert (recorded when changed)."""
            if all(e is None for e in experts):
                return sel
            from .selection import equalize_experts

            with stage.guard(kind, name):
                sel, changed = equalize_experts(sel, scores.neurons, experts)
                check_experts(adapter, sel)
            if changed:
                ctx.report.setdefault("experts_equalized", []).append(
                    {"after": f"{kind}:{name}", "layers": {str(layer): {"kept_per_expert": c, "k": k}
                                                           for layer, (c, k) in changed.items()}})
            return sel

        t = time.perf_counter()
        selection = per_expert(stage("select", recipe.select, check=fits, scores=scores), "select", recipe.select)
        timings[f"select:{recipe.select}"] = time.perf_counter() - t
        for name in recipe.refine:
            t = time.perf_counter()
            selection = per_expert(stage("refine", name, check=fits, scores=scores, selection=selection),
                                   "refine", name)
            timings[f"refine:{name}"] = time.perf_counter() - t
        for name in recipe.correct:
            t = time.perf_counter()
            widths = selection.widths()

            def narrower(sel: Selection, widths: dict[str, list[int]] = widths) -> None:
                sel.check(*counts)
                check_experts(adapter, sel)  # a corrector must keep equal counts per expert itself
                new = sel.widths()
                if any(a > b for k in widths for a, b in zip(new[k], widths[k])):
                    raise ValueError(f"a correct stage may only narrow layers; it widened them: {widths} -> {new}")

            selection = stage("correct", name, check=narrower, selection=selection)
            timings[f"correct:{name}"] = time.perf_counter() - t
        t = time.perf_counter()
        with stage.guard("remove", "remove"):
            apply_selection(adapter, selection)
        timings["remove"] = time.perf_counter() - t
    compressed: dict[str, dict[str, Any]] = {}
    transform_reports = {}
    for name in recipe.transform:
        t = time.perf_counter()
        res: TransformResult = stage("transform", name)
        if res.tensors:
            compressed[name] = {"tensors": res.tensors, "meta": res.meta}
        transform_reports[name] = res.report
        timings[f"transform:{name}"] = time.perf_counter() - t
    if own_resume:
        ctx.resume.remove()
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
        "placement": placement.describe() if placement is not None else None,
        "seed": seed,
    }
    return PruneResult(model, selection, report, compressed, scores if recipe.prunes else None)
