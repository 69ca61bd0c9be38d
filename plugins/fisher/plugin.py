"""The Fisher-mask plugin (Kwon et al., NeurIPS 2022): thin glue over the math modules.

Stages: score ``fisher`` (empirical Fisher diagonal of unit masks, ``collect.py`` +
``fisher_math.py``), select ``fisher-search`` (the head/neuron split under the FLOPs budget,
``search.py``) or ``fisher-latency`` (under a latency budget from tables measured on the
run's device, ``latency_table.py`` + ``latency_search.py``), refine ``fisher-rearrange`` (greedy swap per layer with the layer's Fisher
block, ``rearrange.py``), correct ``fisher-tune`` (layer-wise least-squares mask tuning
folded into the weights, ``tune_model.py`` + ``tuning.py``). The methods are the paper's
ablation as recipes, plus Fisher selection with STAT correction.
"""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec

PAPER = "Kwon et al., A Fast Post-Training Pruning Framework for Transformers, NeurIPS 2022"
GRAD_KEYS = ("fisher_head_grads", "fisher_neuron_grads")  # scores.extra: per layer (batches, units_l)

GRAD_BATCH = Option("fisher_grad_batch_size", "auto", "examples per mask-gradient mini-batch (examples are "
                    "regrouped, whatever --batch-size): auto = the public code's 32 for classification, 12 for "
                    "QA, and 1 (per window) for decoders so the Fisher matrix gets one row per window; 0 = the "
                    "calibration batches as given")
TEACHER = Option("fisher_tune_teacher", "search-sqrt", "mask tuning's teacher: search-sqrt = the search's mask at "
                 "budget sqrt(c), as the public code that produced the published numbers; dense = the unpruned "
                 "model, as the paper's text", choices=("search-sqrt", "dense"))
LAT_BATCH = Option("fisher_latency_batch", 32, "fisher-latency: batch size of the latency tables (the public "
                   "code takes it as a required argument; 32 sequences x the pricing length is compute-bound)")
LAT_TABLE = Option("fisher_latency_table", "", "fisher-latency: a latency table file to use (refused if measured on "
                   "another device); empty = measure on this run's device and cache under $TSHRINK_CACHE/latency")
LAT_POINTS = Option("fisher_latency_points", 24, "fisher-latency: neuron counts timed (interpolated in between; "
                    "every head count is timed)")
CLS_ONLY = Option("fisher_tune_cls_only", "auto", "match only the [CLS] token in the last layer's MLP tuning: "
                  "auto = yes for sequence classification on BERT-style encoders (the public code), no otherwise",
                  choices=("auto", "yes", "no"))
MICRO_BATCH = Option("fisher_micro_batch", 4, "examples per forward/backward inside a gradient mini-batch "
                     "(gradients accumulated: the same Fisher, peak memory of one micro-batch); 0 = whole mini-batch")
LOSS_CHUNK = Option("fisher_loss_chunk", 1024, "causal LMs: tokens per chunk of the output head in the "
                    "next-token loss (the full tokens x vocab logits are never formed)")
DAMP = Option("fisher_damp", 1e-2, "mask tuning: relative damping towards scale 1 (lam = damp^2 x mean squared "
              "norm of a unit's contribution); 0 = plain least squares")
BOUND = Option("fisher_scale_bound", 10.0, "mask tuning: a sub-layer whose scales leave [-b, b] keeps its 0/1 "
               "mask (the public code uses 10); must be >= 1")

UNITS = Option("fisher_attention_units", "group", "attention units under grouped-query attention: whole KV groups "
               "('group', the paper's heads), query heads inside the groups with every group kept and the same "
               "number g' kept in all groups of a layer ('query'), or both ('both'); a mask per query head gives "
               "its Fisher importance, and fisher-search trades each layer's (groups, heads per group) options and "
               "the neurons by removed Fisher importance per MAC. fisher-rearrange and fisher-tune do not handle "
               "query-head units yet (refused): use the recipe score=fisher,select=fisher-search[,correct=stat]. "
               "Default 'group': the published method", ("group", "query", "both"))


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [
        StageSpec("score", "fisher", "empirical Fisher diagonal of head/neuron masks from task-loss gradients",
                  needs_calibration=True, needs_gradients=True, needs_labels=True, options=(GRAD_BATCH, MICRO_BATCH, LOSS_CHUNK, UNITS),
                  paper=PAPER),
        StageSpec("select", "fisher-search", "best split between heads and neurons under the FLOPs budget "
                  "(global importance ranking per unit cost)", options=(UNITS,), paper=PAPER),
        StageSpec("select", "fisher-latency", "Kwon et al.'s latency-aware search: a latency table per head / "
                  "neuron count measured on the run's device (cached), piecewise-linear fit, best split under the "
                  "LATENCY budget (the --flops value is read as the kept latency fraction)", paper=PAPER,
                  options=(LAT_BATCH, LAT_TABLE, LAT_POINTS), budget="latency"),
        StageSpec("refine", "fisher-rearrange", "per layer, greedy swap of kept/pruned units with the layer's "
                  "Fisher block (needs the 'fisher' score stage)", paper=PAPER),
        StageSpec("correct", "fisher-tune", "layer-wise least-squares scales of the kept units, folded into the "
                  "output projections", needs_calibration=True, options=(DAMP, BOUND, TEACHER, CLS_ONLY),
                  paper=PAPER),
    ]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    score, search, rearrange = "fisher", "fisher-search", ("fisher-rearrange",)
    return [
        MethodSpec("fisher", Recipe(score=score, select=search, refine=rearrange, correct=("fisher-tune",)),
                   "Fisher-mask pruning: search + rearrangement + mask tuning", paper=PAPER,
                   compare_by_default=True),
        MethodSpec("fisher-latency", Recipe(score=score, select="fisher-latency", refine=rearrange,
                                            correct=("fisher-tune",)),
                   "Fisher-mask pruning under a latency budget (measured latency tables): the paper's speed-ups",
                   paper=PAPER),
        MethodSpec("fisher-search", Recipe(score=score, select=search),
                   "Fisher-mask ablation: mask search only", paper=PAPER),
        MethodSpec("fisher-rearrange", Recipe(score=score, select=search, refine=rearrange),
                   "Fisher-mask ablation: search + rearrangement, no tuning", paper=PAPER),
        MethodSpec("fisher-stat", Recipe(score=score, select=search, refine=rearrange, correct=("stat",)),
                   "Fisher selection (search + rearrangement) with STAT correction"),
    ]


def grad_batch_size(raw: Any, kind: str) -> int:
    """The mini-batch size of ``fisher_grad_batch_size`` for a task kind (see its help)."""
    from . import published

    if raw == "auto":
        return 1 if kind == "causal" else published.GRAD_BATCH[kind]
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = -1
    if value < 0 or isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError(f"fisher_grad_batch_size must be 'auto' or an integer >= 0 (0 = the calibration "
                         f"batches as given, 1 = per example), got {raw!r}")
    return value


def _pricing(ctx: Any) -> dict[str, Any]:
    """The cost model's length and the calibration data's mean real length (for the record)."""
    calib = ctx.calib
    avg = calib.n_tokens / calib.n_examples if calib is not None else None
    return {"pricing_len": ctx.cost.seq_len, **({"avg_len": round(avg, 2)} if avg is not None else {})}


def _teacher(ctx: Any, search: Any) -> None:
    """Hand the mask-tuning teacher (the same search at budget sqrt(c), as the public code) to
    ``fisher-tune`` through ``ctx.scratch``."""
    import math

    ctx.scratch["fisher_teacher"] = search(math.sqrt(ctx.budget))


@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "fisher":
        return None
    from tshrink.units import UnitScores

    from .collect import collect_mask_grads
    from .fisher_math import fisher_importance

    from . import published

    kind = published.task_kind(ctx.model, ctx.adapter.causal)
    size = grad_batch_size(options["fisher_grad_batch_size"], kind)
    query = [] if options["fisher_attention_units"] != "group" else None
    head_grads, neuron_grads = collect_mask_grads(ctx.adapter, ctx.calib, device=ctx.device, grad_batch_size=size,
                                                  track=ctx.track, micro_batch=options["fisher_micro_batch"],
                                                  chunk_tokens=options["fisher_loss_chunk"], query_out=query)
    ctx.report["fisher"] = {"grad_batches": int(head_grads[0].shape[0]) if head_grads else 0,
                            "grad_batch_size": size, "grad_batch_option": options["fisher_grad_batch_size"],
                            "micro_batch": options["fisher_micro_batch"], "loss_chunk": options["fisher_loss_chunk"]}
    # 0 = the calibration batches as given: record the size they have
    effective = size or max(int(b["input_ids"].shape[0]) for b in ctx.calib.batches)
    used = {"calibration_examples": ctx.calib.n_examples,
            "sampling": ctx.calib.meta.get("sampling", "without replacement"), "grad_batch_size": effective}
    published.record(ctx.report, kind, used)
    # travels with the scores, so a run that reuses them (harness compare, other budgets) records them too
    extra = dict(zip(GRAD_KEYS, (head_grads, neuron_grads)), fisher_settings=used)
    if query is not None:  # one importance per query head (grouped-query attention)
        extra["query_heads"] = [fisher_importance(g) for g in query]
    return UnitScores([fisher_importance(g) for g in head_grads], [fisher_importance(g) for g in neuron_grads],
                      extra=extra)


def _score_settings(scores: Any) -> dict[str, Any]:
    """The score stage's recorded settings (from the scores, also when they were reused)."""
    return dict(scores.extra.get("fisher_settings", {}))


def _select_latency(ctx: Any, scores: Any, options: dict[str, Any]) -> Any:
    from tshrink.units import Selection

    from . import published
    from .latency_search import estimate, search_latency
    from .latency_table import load_or_measure

    batch = int(options["fisher_latency_batch"])
    points = int(options["fisher_latency_points"])
    if batch < 1 or points < 2:
        raise ValueError(f"fisher_latency_batch must be >= 1 and fisher_latency_points >= 2, got {batch} / {points}")
    seq = ctx.cost.seq_len
    tables, source = load_or_measure(ctx.adapter, batch=batch, seq=seq, device=ctx.device,
                                     path=options["fisher_latency_table"] or None, points=points)
    counts = (ctx.adapter.head_counts(), ctx.adapter.neuron_counts())
    dense = estimate(tables["heads"], tables["neurons"], tables["base"], *counts)
    heads = [s.double() for s in scores.heads]
    neurons = [s.double() for s in scores.neurons]

    def search(budget: float) -> tuple[Selection, dict[str, float]]:
        try:
            hm, nm, info = search_latency(heads, neurons, tables["heads"], tables["neurons"], tables["base"],
                                          budget * dense)
        except ValueError as err:
            raise ValueError(f"latency budget {budget:g} of the dense layers ({dense:.4g} ms at batch {batch} x "
                             f"{seq} tokens on {source['device']['name']}): {err}") from None
        return Selection.from_masks(hm, nm), info

    sel, info = search(ctx.budget)
    ctx.scratch["fisher_teacher"] = search(ctx.budget ** 0.5)[0]
    ctx.report["fisher-latency"] = {
        "budget_kind": "latency", "dense_ms": dense, "estimated_ms": info["estimated_ms"],
        "latency_kept_estimated": info["estimated_ms"] / dense if dense else None,
        "heads_kept": sum(map(len, sel.heads)), "neurons_kept": sum(map(len, sel.neurons)),
        "table": {"batch": batch, "seq_len": seq, "points": points, **source, "base_ms": tables["base"]},
    }
    published.record(ctx.report, published.task_kind(ctx.model, ctx.adapter.causal),
                     _score_settings(scores) | _pricing(ctx))
    return sel


@hookimpl
def tshrink_select(name: str, ctx: Any, scores: Any, options: dict[str, Any]) -> Any:
    if name == "fisher-latency":
        return _select_latency(ctx, scores, options)
    if name != "fisher-search":
        return None
    from tshrink.units import Selection

    from .search import search_mask

    from . import published

    cost = ctx.cost

    mode = options["fisher_attention_units"]
    if mode != "group" and "query_heads" not in scores.extra:
        raise ValueError(f"fisher_attention_units={mode!r} needs the query-head importances of score stage 'fisher' "
                         "run with the same option")

    def search(budget: float) -> Selection:
        if mode != "group":  # query-head units: options per layer, removed importance per MAC
            from tshrink.selection import select_query_units

            return select_query_units(scores, scores.extra["query_heads"], cost, budget, mode, normalize="none")
        # the search sees only what the units cost: width-independent costs come off the budget first
        allowed = max(cost.budget_macs(budget) - sum(c.fixed for c in cost.layers), 0.0)
        masks = search_mask([s.double() for s in scores.heads], [s.double() for s in scores.neurons],
                            [c.head for c in cost.layers], [c.neuron for c in cost.layers], allowed)
        return Selection.from_masks(*masks)

    sel = search(ctx.budget)
    _teacher(ctx, search)
    ctx.report["fisher-search"] = {"heads_kept": sum(map(len, sel.heads)), "neurons_kept": sum(map(len, sel.neurons)),
                                   "priced_at_seq_len": cost.seq_len}
    published.record(ctx.report, published.task_kind(ctx.model, ctx.adapter.causal),
                     _score_settings(scores) | _pricing(ctx))
    return sel


@hookimpl
def tshrink_refine(name: str, ctx: Any, scores: Any, selection: Any, options: dict[str, Any]) -> Any:
    if name != "fisher-rearrange":
        return None
    from tshrink.units import Selection

    from .fisher_math import fisher_loss_increase
    from .rearrange import heldout_loss, rearrange_mask

    if selection.query_heads is not None:
        raise ValueError("refine stage 'fisher-rearrange' does not handle query-head units (selection.query_heads); "
                         "use --method 'score=fisher,select=fisher-search' (optionally ',correct=stat') with "
                         "fisher_attention_units")
    if any(k not in scores.extra for k in GRAD_KEYS):
        raise ValueError("refine stage 'fisher-rearrange' needs the per-batch mask gradients of the 'fisher' score "
                         f"stage (scores.extra keys {list(GRAD_KEYS)}); the scores given have {sorted(scores.extra)}")
    counts = (ctx.adapter.head_counts(), ctx.adapter.neuron_counts())
    new, before, after = [], 0.0, 0.0
    inside, held, rows = 0.0, 0.0, None
    for key, masks in zip(GRAD_KEYS, selection.masks(*counts)):
        out = []
        for grads, mask in zip(scores.extra[key], masks):
            keep = mask.bool()
            moved = rearrange_mask(keep, grads)
            before += float(fisher_loss_increase(keep, grads))
            after += float(fisher_loss_increase(moved, grads))
            out.append(moved)
            cv = heldout_loss(grads, int(keep.sum()))
            rows = int(grads.shape[0])
            if cv is not None:
                inside, held = inside + cv[0], held + cv[1]
        new.append(out)
    sel = Selection.from_masks(*new)
    changed = sum(len(set(a) - set(b)) for a, b in zip(sel.heads + sel.neurons, selection.heads + selection.neurons))
    enough = rows is not None and rows >= 2
    ctx.report["fisher-rearrange"] = {
        "units_swapped": changed, "fisher_loss_before": before, "fisher_loss_after": after,
        "gradient_rows": rows,
        # 2-fold cross-fit over the gradient rows, per row: the selection's Fisher loss on rows
        # it was chosen from vs on rows it was not (see rearrange.heldout_loss)
        "fisher_loss_per_row_in_sample": inside if enough else None,
        "fisher_loss_per_row_held_out": held if enough else None,
    }
    return sel


@hookimpl
def tshrink_correct(name: str, ctx: Any, selection: Any, options: dict[str, Any]) -> Any:
    if name != "fisher-tune":
        return None
    from .tune_model import fold_scales, residual_layout, tune_masks

    from . import published
    from .tune_model import CLS_FAMILIES

    if selection.query_heads is not None:
        raise ValueError("correct stage 'fisher-tune' does not handle query-head units (selection.query_heads); "
                         "use correct=stat or no correction")
    bound = float(options["fisher_scale_bound"])
    if not bound >= 1.0:
        raise ValueError(f"fisher_scale_bound must be >= 1 (scale 1, the untuned mask, must be allowed), got {bound!r}")
    kind = published.task_kind(ctx.model, ctx.adapter.causal)
    teacher = None
    if options["fisher_tune_teacher"] == "search-sqrt":
        teacher = ctx.scratch.get("fisher_teacher")
        if teacher is None:
            raise ValueError("fisher_tune_teacher='search-sqrt' needs the teacher mask of the select stage "
                             "'fisher-search' or 'fisher-latency'; with another select stage use "
                             "--opt fisher_tune_teacher=dense")
    cls_family = ctx.adapter.family in CLS_FAMILIES
    seq_cls = kind == "classification" and type(ctx.model).__name__.endswith("ForSequenceClassification")
    cls_only = {"auto": seq_cls and cls_family, "yes": True, "no": False}[options["fisher_tune_cls_only"]]
    if cls_only and not (seq_cls and cls_family):
        raise ValueError(f"fisher_tune_cls_only='yes' needs a sequence classifier of a family that pools the first "
                         f"token ({sorted(CLS_FAMILIES)}); got {type(ctx.model).__name__}: use 'auto' or 'no'")
    result = tune_masks(ctx.adapter, ctx.calib, selection, damp=float(options["fisher_damp"]),
                        bounds=(-bound, bound), device=ctx.device, teacher=teacher, cls_only=cls_only,
                        track=ctx.track, stream_options=ctx.stream_options())
    fold_scales(ctx.adapter, selection, result.heads, result.neurons)
    n = max(len(result.stats), 1)
    ctx.report["fisher-tune"] = {
        "sublayers": len(result.stats), "rejected": result.rejected,
        "targets": ("projection outputs" if residual_layout(ctx.adapter) == "none"
                    else "projection outputs + residual"),
        "mean_rel_error_before": sum(s["rel_error_before"] for s in result.stats) / n,
        "mean_rel_error_after": sum(s["rel_error_after"] for s in result.stats) / n,
        "teacher": options["fisher_tune_teacher"], "cls_only": cls_only,
        "teacher_widths": teacher.widths() if teacher is not None else None,
        "per_sublayer": result.stats,
    }
    used = {"teacher": options["fisher_tune_teacher"]}
    if kind == "classification":
        used["cls_only"] = cls_only
    published.record(ctx.report, kind, used)
    return selection
