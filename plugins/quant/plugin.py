"""The quant plugin: k-means weight sharing, binarization (fixed and BS-Flex) and iterative
magnitude pruning as transform stages. Thin glue over :mod:`.apply` (imported lazily: this
module must not import torch)."""
from __future__ import annotations

from typing import Any

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec

STAGES = ("kmeans", "binarize", "bs-flex", "imp")

SCOPE = Option("quant_scope", "all", "Linear weights to transform: 'attention' (self-attention only; "
               "cross-attention excluded), 'mlp', or 'all' (every Linear inside the transformer layers)",
               ("all", "attention", "mlp"))
GRANULARITY = Option("quant_granularity", "row", "one codebook per output row, per layer, or per "
                     "quant_group_size weights of a row", ("row", "layer", "group"))
GROUP_SIZE = Option("quant_group_size", 0, "weights per codebook group (only with quant_granularity=group)")
LR = Option("quant_lr", 1e-4, "Adam learning rate of the recovery training")
LOSS = Option("quant_loss", "auto", "recovery loss: the model's loss on labelled batches, or MSE of the last "
              "hidden states against the model before the stage; auto = labels when present",
              ("auto", "labels", "distill"))
RETRAIN = Option("quant_retrain_steps", 0, "recovery steps training the centroids with fixed assignments "
                 "(> 0 needs calibration batches)")
TRAINING = (LR, LOSS)

KMEANS_PAPER = "Han et al., Deep Compression, ICLR 2016"
POSTER = "Compressing Transformers via Pruning and Quantization (WMT English-German)"


@hookimpl
def tshrink_stages() -> list[StageSpec]:
    return [
        StageSpec("transform", "kmeans", "k-means weight sharing: 2^bits shared values per row/layer/group, "
                  "deterministic linear initialisation, optional centroid retraining",
                  options=(Option("quant_bits", 4, "index bits per weight (1..8)"), GRANULARITY, GROUP_SIZE,
                           Option("quant_init", "linear", "centroid initialisation",
                                  ("linear", "quantile", "random")),
                           Option("quant_iters", 100, "maximum Lloyd iterations"), SCOPE, RETRAIN, *TRAINING),
                  paper=KMEANS_PAPER),
        StageSpec("transform", "binarize", "fixed-centroid 1-bit k-means: the optimal two values per row "
                  "(exact split), optional centroid retraining with fixed assignments",
                  options=(GRANULARITY, GROUP_SIZE, SCOPE, RETRAIN, *TRAINING)),
        StageSpec("transform", "bs-flex", "flexible binarization: two trainable values per row, weights move "
                  "between the clusters during a short recovery training (0 steps = one-shot binarize)",
                  needs_calibration=True, needs_gradients=True,
                  options=(GRANULARITY, GROUP_SIZE, SCOPE,
                           Option("quant_flex_steps", 16, "recovery training steps"), *TRAINING)),
        StageSpec("transform", "imp", "iterative magnitude pruning (unstructured) along a sparsity schedule, "
                  "optional fine-tuning of the kept weights between steps",
                  options=(Option("quant_imp_schedule", "30,50", "target sparsities in order, e.g. '30,50' "
                                  "or '50,80'"),
                           Option("quant_imp_ranking", "global", "rank |w| over all weights in scope, or "
                                  "per weight tensor", ("global", "layer")),
                           Option("quant_imp_steps", 0, "fine-tuning steps after every pruning step "
                                  "(> 0 needs calibration batches)"), SCOPE, *TRAINING),
                  paper="Han et al., Learning both Weights and Connections, NeurIPS 2015"),
    ]


@hookimpl
def tshrink_methods() -> list[MethodSpec]:
    return [
        MethodSpec("kmeans", Recipe(transform=("kmeans",)),
                   "4-bit k-means weight sharing, one codebook per output row (dense FLOPs unchanged)",
                   paper=KMEANS_PAPER),
        MethodSpec("binarize", Recipe(transform=("binarize",)),
                   "1-bit weights, two fixed optimal values per row (the fixed-centroid baseline)"),
        MethodSpec("bs-flex", Recipe(transform=("bs-flex",)),
                   "1-bit weights with per-row values; a short recovery training lets weights change cluster",
                   paper=POSTER),
        MethodSpec("imp", Recipe(transform=("imp",)),
                   "iterative magnitude pruning to 30 % then 50 % unstructured sparsity",
                   paper="Han et al., Learning both Weights and Connections, NeurIPS 2015"),
        # a composition: STAT's stages (another plugin) then this plugin's k-means; listed as
        # unavailable, not broken, when the STAT plugin is blocked
        MethodSpec("stat-kmeans", Recipe(score="stat", select="stat-allocate", correct=("stat",),
                                         transform=("kmeans",)),
                   "STAT pruning, then 4-bit k-means weight sharing of the pruned weights"),
    ]


@hookimpl
def tshrink_transform(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    if name not in STAGES:
        return None
    from .apply import transform

    return transform(name, ctx.model, options, ctx.calib, track=ctx.track)


@hookimpl
def tshrink_restore(name: str, model: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> Any:
    if name not in STAGES:
        return None
    from .apply import restore

    restore(model, tensors, meta)
    return True
