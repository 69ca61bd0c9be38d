"""Hook implementations: declare one score stage and one method, implement the stage."""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [StageSpec("score", "random", "uniform random importance (a sanity baseline)",
                      options=(Option("salt", 0, "added to the run's seed"),))]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    # Reuse the host's built-in global selector: a new method is a recipe.
    return [MethodSpec("random", Recipe(score="random", select="global"),
                       "random structured pruning under the FLOPs budget")]


@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "random":
        return None  # only "random" is routed here; the check keeps a plain pm.hook call right
    from tshrink.units import UnitScores

    from .scores import random_scores

    gen = ctx.generator(options["salt"])
    return UnitScores(random_scores(ctx.adapter.head_counts(), gen),
                      random_scores(ctx.adapter.neuron_counts(), gen))
