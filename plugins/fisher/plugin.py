"""The Fisher-mask plugin (Kwon et al., NeurIPS 2022): thin glue over the math modules.

Stages: score ``fisher`` (empirical Fisher diagonal of unit masks, ``collect.py`` +
``fisher_math.py``), select ``fisher-search`` (the head/neuron split under the FLOPs budget,
``search.py``), refine ``fisher-rearrange`` (greedy swap per layer with the layer's Fisher
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

GRAD_BATCH = Option("fisher_grad_batch_size", 0, "examples per mask-gradient mini-batch: 0 = the calibration "
                    "batches as given (the public code: 32), 1 = per example (exact empirical Fisher, slower)")
MICRO_BATCH = Option("fisher_micro_batch", 4, "examples per forward/backward inside a gradient mini-batch "
                     "(gradients accumulated: the same Fisher, peak memory of one micro-batch); 0 = whole mini-batch")
LOSS_CHUNK = Option("fisher_loss_chunk", 1024, "causal LMs: tokens per chunk of the output head in the "
                    "next-token loss (the full tokens x vocab logits are never formed)")
DAMP = Option("fisher_damp", 1e-2, "mask tuning: relative damping towards scale 1 (lam = damp^2 x mean squared "
              "norm of a unit's contribution); 0 = plain least squares")
BOUND = Option("fisher_scale_bound", 10.0, "mask tuning: a sub-layer whose scales leave [-b, b] keeps its 0/1 "
               "mask (the public code uses 10); must be >= 1")


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [
        StageSpec("score", "fisher", "empirical Fisher diagonal of head/neuron masks from task-loss gradients",
                  needs_calibration=True, needs_gradients=True, needs_labels=True, options=(GRAD_BATCH, MICRO_BATCH, LOSS_CHUNK),
                  paper=PAPER),
        StageSpec("select", "fisher-search", "best split between heads and neurons under the FLOPs budget "
                  "(global importance ranking per unit cost)", paper=PAPER),
        StageSpec("refine", "fisher-rearrange", "per layer, greedy swap of kept/pruned units with the layer's "
                  "Fisher block (needs the 'fisher' score stage)", paper=PAPER),
        StageSpec("correct", "fisher-tune", "layer-wise least-squares scales of the kept units, folded into the "
                  "output projections", needs_calibration=True, options=(DAMP, BOUND), paper=PAPER),
    ]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    score, search, rearrange = "fisher", "fisher-search", ("fisher-rearrange",)
    return [
        MethodSpec("fisher", Recipe(score=score, select=search, refine=rearrange, correct=("fisher-tune",)),
                   "Fisher-mask pruning: search + rearrangement + mask tuning", paper=PAPER,
                   compare_by_default=True),
        MethodSpec("fisher-search", Recipe(score=score, select=search),
                   "Fisher-mask ablation: mask search only", paper=PAPER),
        MethodSpec("fisher-rearrange", Recipe(score=score, select=search, refine=rearrange),
                   "Fisher-mask ablation: search + rearrangement, no tuning", paper=PAPER),
        MethodSpec("fisher-stat", Recipe(score=score, select=search, refine=rearrange, correct=("stat",)),
                   "Fisher selection (search + rearrangement) with STAT correction"),
    ]


@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "fisher":
        return None
    from tshrink.units import UnitScores

    from .collect import collect_mask_grads
    from .fisher_math import fisher_importance

    head_grads, neuron_grads = collect_mask_grads(ctx.adapter, ctx.calib, device=ctx.device,
                                                  grad_batch_size=options["fisher_grad_batch_size"],
                                                  micro_batch=options["fisher_micro_batch"],
                                                  chunk_tokens=options["fisher_loss_chunk"])
    ctx.report["fisher"] = {"grad_batches": int(head_grads[0].shape[0]) if head_grads else 0,
                            "grad_batch_size": options["fisher_grad_batch_size"],
                            "micro_batch": options["fisher_micro_batch"], "loss_chunk": options["fisher_loss_chunk"]}
    return UnitScores([fisher_importance(g) for g in head_grads], [fisher_importance(g) for g in neuron_grads],
                      extra=dict(zip(GRAD_KEYS, (head_grads, neuron_grads))))


@hookimpl
def tshrink_select(name: str, ctx: Any, scores: Any, options: dict[str, Any]) -> Any:
    if name != "fisher-search":
        return None
    from tshrink.units import Selection

    from .search import search_mask

    cost = ctx.cost
    # the search sees only what the units cost: width-independent costs come off the budget first
    allowed = max(cost.budget_macs(ctx.budget) - sum(c.fixed for c in cost.layers), 0.0)
    head_mask, neuron_mask = search_mask([s.double() for s in scores.heads], [s.double() for s in scores.neurons],
                                         [c.head for c in cost.layers], [c.neuron for c in cost.layers], allowed)
    sel = Selection.from_masks(head_mask, neuron_mask)
    ctx.report["fisher-search"] = {"heads_kept": sum(map(len, sel.heads)), "neurons_kept": sum(map(len, sel.neurons))}
    return sel


@hookimpl
def tshrink_refine(name: str, ctx: Any, scores: Any, selection: Any, options: dict[str, Any]) -> Any:
    if name != "fisher-rearrange":
        return None
    from tshrink.units import Selection

    from .fisher_math import fisher_loss_increase
    from .rearrange import rearrange_mask

    if any(k not in scores.extra for k in GRAD_KEYS):
        raise ValueError("refine stage 'fisher-rearrange' needs the per-batch mask gradients of the 'fisher' score "
                         f"stage (scores.extra keys {list(GRAD_KEYS)}); the scores given have {sorted(scores.extra)}")
    counts = (ctx.adapter.head_counts(), ctx.adapter.neuron_counts())
    new, before, after = [], 0.0, 0.0
    for key, masks in zip(GRAD_KEYS, selection.masks(*counts)):
        out = []
        for grads, mask in zip(scores.extra[key], masks):
            keep = mask.bool()
            moved = rearrange_mask(keep, grads)
            before += float(fisher_loss_increase(keep, grads))
            after += float(fisher_loss_increase(moved, grads))
            out.append(moved)
        new.append(out)
    sel = Selection.from_masks(*new)
    changed = sum(len(set(a) - set(b)) for a, b in zip(sel.heads + sel.neurons, selection.heads + selection.neurons))
    ctx.report["fisher-rearrange"] = {"units_swapped": changed, "fisher_loss_before": before,
                                      "fisher_loss_after": after}
    return sel


@hookimpl
def tshrink_correct(name: str, ctx: Any, selection: Any, options: dict[str, Any]) -> Any:
    if name != "fisher-tune":
        return None
    from .tune_model import fold_scales, tune_masks

    bound = float(options["fisher_scale_bound"])
    if not bound >= 1.0:
        raise ValueError(f"fisher_scale_bound must be >= 1 (scale 1, the untuned mask, must be allowed), got {bound!r}")
    result = tune_masks(ctx.adapter, ctx.calib, selection, damp=float(options["fisher_damp"]),
                        bounds=(-bound, bound), device=ctx.device, stream_options=ctx.stream_options())
    fold_scales(ctx.adapter, selection, result.heads, result.neurons)
    n = max(len(result.stats), 1)
    ctx.report["fisher-tune"] = {
        "sublayers": len(result.stats), "rejected": result.rejected,
        "mean_rel_error_before": sum(s["rel_error_before"] for s in result.stats) / n,
        "mean_rel_error_after": sum(s["rel_error_after"] for s in result.stats) / n,
        "per_sublayer": result.stats,
    }
    return selection
