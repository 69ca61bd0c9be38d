"""Second example plugin: structured Wanda scores plus a least-squares correction, written on
the host's statistics helper (``tshrink.stats.layer_stats``): the method is its math only."""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec

PAPER = "Wanda-sp: the structured Wanda baseline of An et al., FLAP, AAAI 2024"
DAMPING = Option("wanda_damping", 1e-4, "ridge of the least-squares fold, relative to the kept columns' energy")


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [
        StageSpec("score", "example-wanda", "sum of |weight| x input-column norm over each unit's columns",
                  needs_calibration=True, paper=PAPER),
        StageSpec("correct", "lsq-fold", "layer by layer on the already-pruned model: least-squares refit of "
                  "the output/down projection's kept columns", needs_calibration=True, options=(DAMPING,)),
    ]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    return [
        MethodSpec("example-wanda", Recipe(score="example-wanda", select="uniform"),
                   "structured Wanda: the same kept fraction in every layer, as the FLAP authors' baseline",
                   paper=PAPER),
        MethodSpec("example-wanda-fold", Recipe(score="example-wanda", select="uniform", correct=("lsq-fold",)),
                   "structured Wanda with a least-squares correction of the kept units"),
    ]


# The host calls a stage hook only on the plugin that declared the stage, so with one stage per
# hook there is no need to look at ``name``.
@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    from tshrink.stats import layer_stats
    from tshrink.units import UnitScores

    from .wanda_math import wanda_sp_scores

    heads, neurons = [], []
    for st in layer_stats(ctx.adapter, ctx.calib, device=ctx.device, track=ctx.track):
        heads.append(wanda_sp_scores(st.head_weight(), st.heads.col_norm).float().cpu()
                     if st.heads is not None else ctx.adapter.attn(st.layer).o.weight.new_zeros(0))
        neurons.append(wanda_sp_scores(st.neuron_weight(), st.neurons.col_norm).float().cpu()
                       if st.neurons is not None else ctx.adapter.mlp(st.layer).out.weight.new_zeros(0))
    return UnitScores(heads, neurons)


@hookimpl
def tshrink_correct(name: str, ctx: Any, selection: Any, options: dict[str, Any]) -> Any:
    import torch

    from tshrink.stats import layer_stats

    from .wanda_math import least_squares_fold

    def fold(linear: torch.nn.Linear, gram: torch.Tensor, cols: torch.Tensor) -> None:
        with torch.no_grad():
            linear.weight[:, cols] = least_squares_fold(linear.weight, gram, cols.to(gram.device),
                                                        options["wanda_damping"]).to(linear.weight)

    for st in layer_stats(ctx.adapter, ctx.calib, gram="full", sequential=True, device=ctx.device,
                          track=ctx.track):
        keep_h, keep_n = selection.heads[st.layer], selection.neurons[st.layer]
        if st.heads is not None and 0 < len(keep_h) < st.attn.units:
            fold(st.attn.o, st.heads.gram, ctx.adapter.unit_columns(st.layer, keep_h))
        if st.neurons is not None and 0 < len(keep_n) < st.mlp.neurons:
            fold(st.mlp.out, st.neurons.gram, torch.as_tensor(keep_n, dtype=torch.long))
        st.keep(heads=keep_h, neurons=keep_n)  # the next layer is measured on the pruned model
    return selection
