"""The STAT plugin: interpolative-decomposition pruning with folded corrections.

Stages (thin glue over :mod:`.prune`, :mod:`.allocate`, :mod:`.idecomp`; torch and scipy
are imported inside the hooks so that listing plugins stays cheap):

- score ``stat``: per-layer error curves of the neuron ID and the head block selection on
  the dense model (one layer at a time), unit scores = convexified error reductions;
- select ``stat-allocate``: widths from the curves under one FLOPs budget (greedy error
  reduction per MAC, no fixed attention/MLP share), each layer keeping its pivot prefix;
- correct ``stat``: sequential re-decomposition at the selected widths and least-squares
  folds into the output/down projections (works after any selector).

Numerical route and its rationale: see the docstring of :mod:`.prune`.
"""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec

PAPER = "Flynn et al., Shrinking Transformers After Training (STAT), arXiv 2406.00061"

SKETCH = Option("stat_sketch", "none", "activation statistics at the correct stage: exact Gram ('none') or a "
                "streamed row sketch (Gaussian / CountSketch, then pivoted QR of the sketch on the device); used "
                "only where it is cheaper than the Gram (rows < columns), never when scoring. Default 'none': at "
                "encoder and 1B widths the exact Gram is affordable and loses nothing",
                ("none", "gaussian", "countsketch"))
SKETCH_SIZE = Option("stat_sketch_size", 0, "rows of the sketch; 0 = 2k+10 (Gaussian) or 4k+10 (CountSketch) "
                     "for the kept width k; at least the number of columns means the exact Gram")
CENTER = Option("stat_center", True, "when the output projection has a bias: decompose centred activations "
                "and fold the removed units' mean output into the bias. Default on: the bias then absorbs the "
                "removed units' mean contribution for free, and the decomposition is not spent on the mean direction")
ERROR_NORM = Option("stat_error_norm", "stream", "scale of the error curves: relative to the typical "
                    "(median-token) energy of the residual stream entering the layer ('stream') or absolute "
                    "output error ('none'). Default 'stream': the residual stream's scale differs from layer to "
                    "layer; relative errors make layers comparable for the global allocation", ("stream", "none"))
ALLOCATION = Option("stat_allocation", "global", "widths: greedy error reduction per MAC over all layers and "
                    "both kinds ('global') or the same kept fraction in every layer ('uniform'). Default 'global': "
                    "measured better (README ablations: STS-B 86.4/86.3/86.2 vs 86.1/85.4/85.0 at 60/50/40 %; "
                    "SmolLM2 MLP-only at 86 % FLOPs perplexity 55.5 vs 60.3)", ("global", "uniform"))
PRUNE_HEADS = Option("stat_prune_heads", True, "prune attention units too (False: MLP neurons only, unless "
                     "the budget cannot be met without heads). Default on: the budget is shared by both kinds "
                     "and the allocation decides where the error is cheapest")
MIN_WIDTH = Option("stat_min_width", 0.0, "global allocation: every layer keeps at least this fraction of its "
                   "attention units and of its MLP neurons (rounded down; 0 = no floor). Guards against "
                   "near-empty layers, e.g. 5 of 256 neurons kept at 35 % FLOPs on a tiny Llama")
SEQUENTIAL = Option("stat_sequential", "layer", "statistics of each layer from the already pruned model: "
                    "'layer' (2 passes per layer), 'sublayer' (the MLP also sees its layer's pruned "
                    "attention; up to 3 passes), 'none' (all from the dense model, 1 pass). Default 'layer': each "
                    "layer's fold then also corrects the drift the pruned layers before it left (the paper's "
                    "sequential pruning) at 2 passes; 'sublayer' costs a third pass per layer and measured no better "
                    "for either kind (SmolLM2 WikiText-2, MiniLM MRPC: results/benchmarks/stat_sequential.json)",
                    ("layer", "sublayer", "none"))
REPICK = Option("stat_repick", True, "re-choose the units of each layer by the decomposition at the "
                "selected width (False: keep the selector's units, only fold the correction). Default on: the "
                "decomposition at the final width, on the already pruned model, picks the units that fold best")
HEAD_RULE = Option("stat_head_rule", "block", "head (or KV-group) order: greedy block-pivoted decomposition "
                   "of the output projection's input, each block scaled by its output columns ('block'), or "
                   "pivoted Cholesky of the units x units Gram of per-unit traces scaled by the output columns' "
                   "norms ('trace', the STAT prototype's rule). Default 'block': with it `stat` is not below the "
                   "prototype beyond the seed spread on SST-2, MRPC, STS-B, RTE (benchmarks/stat_vs_prototype.py)",
                   ("block", "trace"))
ATTENTION_UNITS = Option("stat_attention_units", "group", "attention units under grouped-query attention: whole "
                         "KV groups ('group'), query heads inside the groups, every group kept and the same number "
                         "g' of its query heads kept in all groups of a layer ('query'), or both at once ('both': "
                         "each layer keeps U' groups of g' heads). Scores: the exact fold error of every option; "
                         "the global allocation trades them by error per MAC of the cost model. Default 'group' (the "
                         "published units): on SmolLM2 the finer units gained 1-2 % perplexity (pydocs, 80 / 60 %: "
                         "20.06 / 28.31 -> query 19.79 / 28.10, both 19.98 / 27.72; "
                         "results/benchmarks/gqa_units_smollm2.md), one model and seed, too little to change "
                         "it; with multi-head attention the three are the same", ("group", "query", "both"))
DAMPING = Option("stat_damping", 1e-6, "ridge of the least-squares fold, relative to the mean column energy. "
                 "Default 1e-6: only guards rank-deficient Grams (dead or duplicate units) without biasing the fold")


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [
        StageSpec("score", "stat", "error curves of the neuron ID and head block selection per layer "
                  "(dense model, layer by layer); score = convexified error reduction of the unit",
                  needs_calibration=True, options=(SKETCH, SKETCH_SIZE, CENTER, ERROR_NORM, HEAD_RULE, ATTENTION_UNITS), paper=PAPER),
        StageSpec("select", "stat-allocate", "per-layer head/neuron widths from the STAT error curves under "
                  "the FLOPs budget", options=(ALLOCATION, PRUNE_HEADS, MIN_WIDTH, ATTENTION_UNITS), paper=PAPER),
        StageSpec("correct", "stat", "sequential ID re-selection at the chosen widths with least-squares "
                  "folds into the down and output projections", needs_calibration=True,
                  options=(SKETCH, SKETCH_SIZE, CENTER, SEQUENTIAL, REPICK, DAMPING, HEAD_RULE),
                  paper=PAPER),
    ]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    full = Recipe(score="stat", select="stat-allocate", correct=("stat",))
    return [
        MethodSpec("stat", full, "STAT: ID-based head and neuron pruning, global allocation from the "
                   "decompositions' errors, sequential least-squares folds", paper=PAPER, compare_by_default=True),
        MethodSpec("stat-uniform", Recipe(score="stat", select="uniform", correct=("stat",)),
                   "STAT with the same kept fraction of heads and neurons in every layer", paper=PAPER),
        MethodSpec("stat-mlp", full, "STAT on MLP neurons only (attention kept), global allocation",
                   paper=PAPER, defaults={"stat_prune_heads": False}),
    ]


@hookimpl
def tshrink_score(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name != "stat":
        return None
    from .prune import StatConfig, stat_scores

    cfg = StatConfig.from_options(options, ctx.seed)
    return stat_scores(ctx.adapter, ctx.calib, cfg, device=ctx.device,
                       report=ctx.report.setdefault("stat:score", {}), track=ctx.track,
                       stream_options=ctx.stream_options(), state=ctx.layer_state(cfg))


@hookimpl
def tshrink_select(name: str, ctx: Any, scores: Any, options: dict[str, Any]) -> Any:
    if name != "stat-allocate":
        return None
    from .prune import stat_allocate

    return stat_allocate(scores, ctx.cost, ctx.budget, allocation=options["stat_allocation"],
                         prune_heads=options["stat_prune_heads"], min_width=options["stat_min_width"],
                         attention_units=options["stat_attention_units"],
                         report=ctx.report.setdefault("stat:select", {}))


@hookimpl
def tshrink_correct(name: str, ctx: Any, selection: Any, options: dict[str, Any]) -> Any:
    if name != "stat":
        return None
    from .prune import StatConfig, stat_correct

    cfg = StatConfig.from_options(options, ctx.seed)
    return stat_correct(ctx.adapter, ctx.calib, selection, cfg,
                        device=ctx.device, report=ctx.report.setdefault("stat:correct", {}), track=ctx.track,
                        stream_options=ctx.stream_options(),
                        state=ctx.layer_state([cfg, selection.heads, selection.neurons]))
