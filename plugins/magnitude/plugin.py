"""The magnitude plugin: weight-norm scores, the generic budget selectors, and classic
unstructured magnitude pruning. Thin glue over :mod:`.scores` and :mod:`tshrink.selection`."""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec

NORM = Option("norm", "l2", "weight norm used as a unit's score", ("l1", "l2"))
NORMALIZE = Option("normalize", "kind", "global ranking: divide scores by the mean of their kind "
                   "('kind'), of their kind within the layer ('layer'), or not at all", ("kind", "layer", "none"))
PER_COST = Option("per_cost", False, "global ranking: rank by score per MAC instead of score")
ATTENTION_UNITS = Option("magnitude_attention_units", "group", "attention units under grouped-query attention: "
                         "whole KV groups ('group'), query heads inside the groups with every group kept and the "
                         "same number g' kept in all groups of a layer ('query'), or both ('both'); scores per query "
                         "head are the norms of its Q rows and output-projection columns. With 'query' / 'both' the "
                         "global ranking trades each layer's (groups, heads per group) options and the neurons by "
                         "removed (normalised) score per MAC (per_cost is implied). Default 'group': the "
                         "units of the published method", ("group", "query", "both"))


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [
        StageSpec("score", "magnitude", "norm of each unit's weights", options=(NORM, ATTENTION_UNITS)),
        StageSpec("select", "global", "one ranking over all layers, greedy under the FLOPs budget",
                  options=(NORMALIZE, PER_COST, ATTENTION_UNITS)),
        StageSpec("select", "uniform", "the same kept fraction of heads and neurons in every layer"),
        StageSpec("transform", "unstructured-magnitude",
                  "zero the smallest weights of all layer Linears (sparsity = 1 - budget unless set)",
                  options=(Option("sparsity", -1.0, "fraction of weights to zero; -1 means 1 - budget"),)),
    ]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    return [
        MethodSpec("magnitude", Recipe(score="magnitude", select="global"),
                   "structured magnitude pruning of heads and neurons, global ranking, no correction",
                   compare_by_default=True),
        MethodSpec("magnitude-uniform", Recipe(score="magnitude", select="uniform"),
                   "structured magnitude pruning, same fraction kept in every layer"),
        MethodSpec("magnitude-unstructured", Recipe(transform=("unstructured-magnitude",)),
                   "classic unstructured magnitude pruning (zeros; dense FLOPs unchanged)",
                   paper="Han et al., Learning both Weights and Connections, NeurIPS 2015"),
    ]


@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "magnitude":
        return None
    from tshrink.units import UnitScores

    from .scores import head_scores, neuron_scores

    from .scores import query_head_scores

    n = ctx.adapter.num_layers
    extra = {}
    if options["magnitude_attention_units"] != "group":
        extra["query_heads"] = [query_head_scores(ctx.adapter, i, options["norm"]) for i in range(n)]
    return UnitScores([head_scores(ctx.adapter, i, options["norm"]) for i in range(n)],
                      [neuron_scores(ctx.adapter, i, options["norm"]) for i in range(n)], extra)


@hookimpl
def tshrink_select(name: str, ctx: Any, scores: Any, options: dict[str, Any]) -> Any:
    from tshrink.selection import select_global, select_uniform

    if name == "global" and options["magnitude_attention_units"] != "group":
        from tshrink.selection import select_query_units

        mode = options["magnitude_attention_units"]
        if "query_heads" not in scores.extra:
            raise ValueError(f"magnitude_attention_units={mode!r} needs query-head scores in scores.extra['query_heads'] "
                             "(score stage 'magnitude' with the same option); this score stage has none")
        return select_query_units(scores, scores.extra["query_heads"], ctx.cost, ctx.budget, mode,
                                  normalize=options["normalize"])
    if name == "global":
        return select_global(scores, ctx.cost, ctx.budget, normalize=options["normalize"],
                             per_cost=options["per_cost"])
    if name == "uniform":
        return select_uniform(scores, ctx.cost, ctx.budget)
    return None


@hookimpl
def tshrink_transform(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "unstructured-magnitude":
        return None
    from tshrink.units import TransformResult

    from .scores import unstructured_prune

    sparsity = options["sparsity"] if options["sparsity"] >= 0 else 1.0 - ctx.budget
    return TransformResult(report=unstructured_prune(ctx.adapter, sparsity))
