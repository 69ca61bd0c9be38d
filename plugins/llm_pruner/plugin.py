"""The LLM-Pruner plugin (without LoRA recovery): thin glue over :mod:`.taylor` and :mod:`.collect`.

Score ``llm-pruner``: Taylor importance of each attention unit / MLP neuron group from the
language-modelling loss on the calibration data (``llm_pruner_taylor``, default the code's
``param_mix``). Select ``llm-pruner-block``: the block-wise setting of the paper's LLaMA
runs: the same kept fraction of heads and neurons in every layer except the first
``llm_pruner_skip_first`` and the last ``llm_pruner_skip_last`` (LLaMA-7B: layers 4-29 of 32
are pruned, so 4 and 2; by default scaled to the model's depth: SmolLM2's 30 layers also
give 4 and 2), the fraction chosen to meet the FLOPs budget. No tuning afterwards.

Deviations (recorded in each run's report): budget = kept FLOPs (the code: a pruning ratio
per pruned layer); a unit is a KV group under grouped-query attention; calibration = the
harness's, shared by all methods (the code: 10 BookCorpus samples of 64 tokens).
"""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec

PAPER = "Ma et al., LLM-Pruner: On the Structural Pruning of Large Language Models, NeurIPS 2023"
TAYLOR = Option("llm_pruner_taylor", "param_mix", "element importance: first-order w*g, second-order w*acc*w, "
                "or their mix w*g - 0.5*w*acc*w (the code's default)", ("param_first", "param_second", "param_mix"))
SKIP_FIRST = Option("llm_pruner_skip_first", -1, "layers at the start that are not pruned; -1 = the paper's "
                    "LLaMA-7B setting scaled to the depth: round(4/32 x layers)")
SKIP_LAST = Option("llm_pruner_skip_last", -1, "layers at the end that are not pruned; -1 = round(2/32 x layers)")


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [
        StageSpec("score", "llm-pruner", "Taylor importance of head / neuron groups from the LM loss (summed "
                  "|importance| over the group's weights)", needs_calibration=True, needs_gradients=True,
                  needs_labels=True, options=(TAYLOR,), paper=PAPER),
        StageSpec("select", "llm-pruner-block", "same kept fraction of heads and neurons in every layer but the "
                  "first/last few, chosen for the FLOPs budget", options=(SKIP_FIRST, SKIP_LAST), paper=PAPER),
    ]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    return [MethodSpec("llm-pruner", Recipe(score="llm-pruner", select="llm-pruner-block"),
                       "LLM-Pruner without tuning: block-wise Taylor pruning, no LoRA recovery", paper=PAPER)]


@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "llm-pruner":
        return None
    from tshrink.units import UnitScores

    from .collect import collect_weight_grads, layer_linears
    from .taylor import head_importance, neuron_importance, salience

    moe = [layer for layer in range(ctx.adapter.num_layers) if ctx.adapter.experts(layer) is not None]
    if moe:
        raise ValueError(f"LLM-Pruner's Taylor importance of mixture-of-experts layers {moe} is not implemented "
                         "(the experts' weights are fused 3-D tensors; the reference code prunes dense LLMs only)")
    grads, acc = collect_weight_grads(ctx.adapter, ctx.calib, device=ctx.device)
    mode = options["llm_pruner_taylor"]
    heads, neurons = [], []
    for layer in range(ctx.adapter.num_layers):
        lin = layer_linears(ctx.adapter, layer)
        s = {n: salience(lin[n].weight.cpu(), grads[layer][n], acc[layer][n], mode) for n in lin}
        a = ctx.adapter.attn(layer)
        if "q" in s:
            heads.append(head_importance(s["q"], s["k"], s["v"], s["o"], a.head_dim, a.group).float())
        else:
            heads.append(s["o"].new_zeros(0).float())
        inputs = [s[n] for n in sorted(s) if n.startswith("in")]
        neurons.append(neuron_importance(inputs, s["down"]).float())
    ctx.report["llm-pruner"] = {"taylor": mode, "grad_examples": ctx.calib.n_examples, "tuning": "none",
                                "deviations": ["budget: kept FLOPs (reference code: pruning ratio per layer)",
                                               "calibration: the harness's, shared by all methods"]}
    return UnitScores(heads, neurons)


@hookimpl
def tshrink_select(name: str, ctx: Any, scores: Any, options: dict[str, Any]) -> Any:
    if name != "llm-pruner-block":
        return None
    from tshrink.units import Selection

    from .taylor import block_selection_fraction, top_k

    n = ctx.adapter.num_layers
    first, last = options["llm_pruner_skip_first"], options["llm_pruner_skip_last"]
    first = round(4 * n / 32) if first == -1 else first  # LLaMA-7B: layers 4..29 of 32 are pruned
    last = round(2 * n / 32) if last == -1 else last
    if first < 0 or last < 0:
        raise ValueError(f"llm_pruner_skip_first={first} / llm_pruner_skip_last={last} must be >= 0 (or -1)")
    pruned = [first <= layer < n - last for layer in range(n)]
    if not any(pruned):
        raise ValueError(f"llm_pruner_skip_first={first} + llm_pruner_skip_last={last} leave none of the {n} layers "
                         "to prune")
    hc, nc = ctx.adapter.head_counts(), ctx.adapter.neuron_counts()
    frac = block_selection_fraction(hc, nc, pruned, ctx.cost, ctx.budget)
    ctx.report["llm-pruner-block"] = {"kept_fraction": frac, "pruned_layers": [i for i, p in enumerate(pruned) if p]}
    return Selection([top_k(s, round(frac * c)) if p else list(range(c)) for s, c, p in zip(scores.heads, hc, pruned)],
                     [top_k(s, round(frac * c)) if p else list(range(c)) for s, c, p in zip(scores.neurons, nc, pruned)])
