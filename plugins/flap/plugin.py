"""The FLAP plugin: thin glue over :mod:`.flap_math` and :mod:`tshrink.stats`.

Stages: score ``flap`` (fluctuation metric of each unit's output-projection columns on the
dense model, one layer at a time), select ``flap-search`` (per-layer, per-module
standardisation and one global ranking under the FLOPs budget), correct ``flap-bias`` (the
removed channels' mean contribution added as a bias of the output / down projection; works
after any selector, and adds a bias where Llama has none). Methods: ``flap`` as published,
``flap-nobias`` (its ablation) and ``flap-stat`` (FLAP selection, STAT correction).

Deviations from the reference code, recorded in each run's report: budget = kept FLOPs under
the cost model (the code: a parameter ratio); exact per-channel variance over all calibration
tokens (the code: a running estimate that skips the first sequence); calibration = the
harness's, the same for every method (the code: 1024 WikiText-2 train windows of 128 tokens).
"""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Recipe, StageSpec

PAPER = "An et al., Fluctuation-based Adaptive Structured Pruning for Large Language Models (FLAP), AAAI 2024"
EXTRA = "flap_standardized"  # scores.extra: (heads, neurons) standardised unit scores per layer
DEVIATIONS = ["budget: kept FLOPs of the cost model (reference code: parameter ratio, a head = 512/3 neurons)",
              "variance: exact over all calibration tokens (reference code: running estimate skipping the first "
              "sequence)", "calibration: the harness's, shared by all methods"]


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [
        StageSpec("score", "flap", "fluctuation (WIFV): variance of each output-projection input channel x its "
                  "squared weight-column norm, per head (mean) and neuron, dense model", needs_calibration=True,
                  paper=PAPER),
        StageSpec("select", "flap-search", "adaptive structure search: scores standardised per layer and module, "
                  "one global ranking cut at the FLOPs budget", paper=PAPER),
        StageSpec("correct", "flap-bias", "bias compensation: removed channels' mean contribution added to the "
                  "output / down projection's bias", needs_calibration=True, paper=PAPER),
    ]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    return [
        MethodSpec("flap", Recipe(score="flap", select="flap-search", correct=("flap-bias",)),
                   "FLAP: fluctuation scores, adaptive global structure, bias compensation", paper=PAPER),
        MethodSpec("flap-nobias", Recipe(score="flap", select="flap-search"),
                   "FLAP ablation: no bias compensation", paper=PAPER),
        MethodSpec("flap-stat", Recipe(score="flap", select="flap-search", correct=("stat",)),
                   "FLAP selection with STAT correction"),
    ]


@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "flap":
        return None
    from tshrink.stats import output_input_stats
    from tshrink.units import UnitScores

    from .flap_math import standardize, unit_means, wifv

    attn, mlp = output_input_stats(ctx.adapter, ctx.calib, device=ctx.device)
    heads, neurons, heads_std, neurons_std = [], [], [], []
    for layer in range(ctx.adapter.num_layers):
        a, m = ctx.adapter.attn(layer), ctx.adapter.mlp(layer)
        width = a.head_dim * a.group
        ch_a = wifv(attn[layer].var, a.o.weight) ** 2  # (units*width,): squared, as the reference code
        ch_m = wifv(mlp[layer].var, m.out.weight)  # (neurons,)
        heads.append(unit_means(ch_a, width).float())
        neurons.append(ch_m.float())
        heads_std.append(unit_means(standardize(ch_a), width))
        neurons_std.append(standardize(ch_m))
    ctx.report["flap"] = {"metric": "WIFV", "structure": "AL-AM", "tokens": attn[0].tokens if attn else 0,
                          "deviations": DEVIATIONS}
    return UnitScores(heads, neurons, extra={EXTRA: (heads_std, neurons_std)})


@hookimpl
def tshrink_select(name: str, ctx: Any, scores: Any, options: dict[str, Any]) -> Any:
    if name != "flap-search":
        return None
    from .flap_math import adaptive_search, standardize

    if EXTRA in scores.extra:  # FLAP's own scores: standardised over channels, then per unit
        heads, neurons = scores.extra[EXTRA]
    else:  # any other score stage: standardise its unit scores per layer and module
        heads, neurons = [standardize(s) for s in scores.heads], [standardize(s) for s in scores.neurons]
    return adaptive_search(heads, neurons, ctx.cost, ctx.budget)


@hookimpl
def tshrink_correct(name: str, ctx: Any, selection: Any, options: dict[str, Any]) -> Any:
    if name != "flap-bias":
        return None
    import torch

    from tshrink.stats import output_input_stats
    from tshrink.surgery import add_output_bias

    from .flap_math import compensation_bias

    adapter = ctx.adapter
    attn, mlp = output_input_stats(adapter, ctx.calib, device=ctx.device)  # means of the model as it is
    deltas = []
    for layer in range(adapter.num_layers):
        a, m = adapter.attn(layer), adapter.mlp(layer)
        keep_cols = adapter.unit_columns(layer, selection.heads[layer])
        removed_a = _complement(keep_cols, a.o.in_features)
        removed_m = _complement(torch.as_tensor(selection.neurons[layer], dtype=torch.long), m.out.in_features)
        deltas.append((compensation_bias(a.o.weight, attn[layer].mean, removed_a),
                       compensation_bias(m.out.weight, mlp[layer].mean, removed_m)))
    moe = [layer for layer in range(adapter.num_layers) if adapter.experts(layer) is not None]
    for layer, (da, dm) in enumerate(deltas):  # after all statistics: they stay those of the unpruned model
        add_output_bias(adapter, layer, "attn", da)
        if layer not in moe:
            add_output_bias(adapter, layer, "mlp", dm)
    ctx.report["flap-bias"] = {"layers": adapter.num_layers, "tokens": attn[0].tokens if attn else 0}
    if moe:  # the experts (stored as fused 3-D tensors) have no output bias to hold the compensation
        ctx.report["flap-bias"]["deviations"] = [f"mixture-of-experts layers {moe}: no MLP bias compensation "
                                                 "(the MoE block has no output bias); attention compensated"]
    return selection


def _complement(keep: Any, n: int) -> Any:
    import torch

    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return torch.nonzero(mask).flatten()
