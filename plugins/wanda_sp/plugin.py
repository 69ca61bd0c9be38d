"""The Wanda-sp plugin: thin glue over :mod:`.scores` and :mod:`tshrink.stats`.

Score ``wanda-sp``: ``sum over the unit's output-projection columns of mean|W| x ||X||``
(dense model, one layer at a time). Methods: ``wanda-sp`` as the FLAP repository runs it
(the same kept fraction of heads and neurons in every layer, no bias compensation) and
``wanda-sp-global`` (one global ranking, scores divided by their kind's mean).

Deviation from the reference code (recorded in each run's report): statistics of every layer
come from the dense model (the code prunes layer by layer, each layer seeing the pruned
layers before it); calibration is the harness's, shared by all methods (the code: 128 C4
windows).
"""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Recipe, StageSpec

PAPER = ("An et al., FLAP, AAAI 2024 (its Wanda-sp baseline); Sun et al., A Simple and Effective Pruning "
         "Approach for Large Language Models (Wanda), ICLR 2024")


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [StageSpec("score", "wanda-sp", "structured Wanda: sum over a unit's output-projection columns of "
                      "mean |W| x input norm (dense model)", needs_calibration=True, paper=PAPER)]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    return [
        MethodSpec("wanda-sp", Recipe(score="wanda-sp", select="uniform"),
                   "Wanda-sp as the FLAP code runs it: same kept fraction per layer, no correction", paper=PAPER),
        MethodSpec("wanda-sp-global", Recipe(score="wanda-sp", select="global"),
                   "Wanda-sp scores with one global ranking", paper=PAPER),
    ]


@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "wanda-sp":
        return None
    from tshrink.stats import output_input_stats
    from tshrink.units import UnitScores

    from .scores import channel_scores, unit_sums

    attn, mlp = output_input_stats(ctx.adapter, ctx.calib, device=ctx.device)
    heads, neurons = [], []
    for layer in range(ctx.adapter.num_layers):
        a, m = ctx.adapter.attn(layer), ctx.adapter.mlp(layer)
        heads.append(unit_sums(channel_scores(attn[layer].sumsq, attn[layer].sequences, a.o.weight),
                               a.head_dim * a.group).float())
        neurons.append(channel_scores(mlp[layer].sumsq, mlp[layer].sequences, m.out.weight).float())
    ctx.report["wanda-sp"] = {"deviations": ["statistics from the dense model (reference code: sequential)",
                                             "calibration: the harness's, shared by all methods"]}
    return UnitScores(heads, neurons)
