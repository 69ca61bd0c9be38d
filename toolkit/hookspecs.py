"""Hook specifications: the contract between the host and a compression method.

A method is split into stages. A stage name belongs to exactly one plugin, which declares it
through :func:`tshrink_stages` and implements the matching *stage hook*. The host calls each
stage hook on the plugin that declared the stage only (the registry knows it), with the
stage's ``name`` and the stage's own options; returning ``None`` there is an error ("returned
None for its own stage"). Checking ``name`` first (and returning ``None`` for names that are
not yours) is still good practice: it keeps a plugin correct under a plain ``pm.hook`` call.

Whatever goes wrong inside a stage call (an exception, a wrong return type, wrong shapes, a
selection over the budget) reaches the caller as one :class:`tshrink.errors.StageError`
naming the stage, plugin, package and version, method and budget; the plugin's exception is
its ``__cause__``.

Execution order for one prune (see :mod:`tshrink.pipeline`)::

    score -> select -> refine* -> correct* -> (physical removal) -> transform*

Every stage receives a :class:`tshrink.pipeline.PruneContext` (the model, its architecture
adapter, the cost model, the FLOPs budget, calibration data, device, seed) and its resolved
options as a plain ``dict``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import hookspec

if TYPE_CHECKING:  # imported for annotations only; keeps this module import-cheap
    from .pipeline import PruneContext
    from .spec import MethodSpec, StageSpec
    from .units import Selection, TransformResult, UnitScores


@hookspec
def tshrink_stages() -> "list[StageSpec]":
    """Declare the stages this plugin implements (kind, name, needs, options, paper).

    Called once when the registry is built. Every stage name must be unique across all
    plugins; a duplicate is an error naming both plugins.
    """


@hookspec
def tshrink_methods() -> "list[MethodSpec]":
    """Declare named methods: a recipe of stages (possibly from other plugins) plus defaults.

    Recipes are checked against the declared stages when the registry is built.
    """


@hookspec(firstresult=True)
def tshrink_score(name: str, ctx: "PruneContext", options: dict[str, Any]) -> "UnitScores | None":
    """Score every prunable unit (attention-head units and MLP neurons of every layer).

    Higher means more important. Return ``None`` if ``name`` is not yours. Must not change
    the model's weights (soft masks installed for gradients must be removed again), and must
    not depend on ``ctx.budget``: scores are a function of the dense model, the calibration
    data, the seed and the score stage's own options, so the host computes them once and
    reuses them for every budget of a comparison (``prune(..., scores=...)``). Later stages
    must treat ``scores`` (including ``scores.extra``) as read-only.
    """


@hookspec(firstresult=True)
def tshrink_select(
    name: str, ctx: "PruneContext", scores: "UnitScores", options: dict[str, Any]
) -> "Selection | None":
    """Choose the units to keep so that the cost model's FLOPs stay within ``ctx.budget``.

    Return ``None`` if ``name`` is not yours. The host checks the budget afterwards and
    raises if a selector overshoots it.
    """


@hookspec(firstresult=True)
def tshrink_refine(
    name: str,
    ctx: "PruneContext",
    scores: "UnitScores",
    selection: "Selection",
    options: dict[str, Any],
) -> "Selection | None":
    """Improve a selection without raising its cost (e.g. mask rearrangement).

    Return ``None`` if ``name`` is not yours, else the new selection (the host checks that
    its cost did not grow beyond the budget).
    """


@hookspec(firstresult=True)
def tshrink_correct(
    name: str, ctx: "PruneContext", selection: "Selection", options: dict[str, Any]
) -> "Selection | None":
    """Change the weights of the still-dense model so that, once the units outside the
    selection are removed, the outputs stay close to the dense model's.

    A corrector may also re-choose units inside each layer as long as per-layer widths do not
    grow (STAT re-picks columns by its decomposition). Return the selection that must be
    removed physically afterwards, or ``None`` if ``name`` is not yours. The host performs the
    physical removal; correctors never resize modules themselves.
    """


@hookspec(firstresult=True)
def tshrink_transform(
    name: str, ctx: "PruneContext", options: dict[str, Any]
) -> "TransformResult | None":
    """Transform weights after structured pruning (quantization, unstructured sparsity).

    Runs on the physically pruned model. Return ``None`` if ``name`` is not yours, else a
    :class:`TransformResult` whose ``tensors`` (if any) the host saves next to the checkpoint
    as the compact form, and whose ``report`` lands in the JSON report.
    """


@hookspec(firstresult=True)
def tshrink_restore(name: str, model: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> "bool | None":
    """Load a compact form written by this plugin's ``tshrink_transform`` back into ``model``
    (dequantised weights in place). Called only on the plugin that declared transform stage
    ``name``; return ``True`` once restored.
    """
