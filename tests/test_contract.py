"""Every registered method, built-in or third-party, goes through the same contract.

On a tiny encoder and a tiny GQA decoder: the method runs through :func:`tshrink.prune`,
meets its FLOPs budget, leaves a model that runs, and saves/reloads to identical outputs.
New plugins are picked up automatically (entry points), so this file never names a method.
The clauses live in :mod:`tshrink.testing`, so a plugin repository runs exactly these
(``check_method(name)``).
"""
from __future__ import annotations

import pytest

from tshrink.manager import get_plugin_manager
from tshrink.registry import Registry
from tshrink.testing import check_deterministic, check_method, check_needs, check_prune, check_scores_reuse

PM = get_plugin_manager()
REGISTRY = Registry(PM)
METHODS = sorted(REGISTRY.methods)
PRUNING = [m for m in METHODS if REGISTRY.method(m).recipe.prunes]


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_method_contract(method, family, tmp_path):
    check_prune(method, family, pm=PM, tmp_dir=tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_method_is_deterministic(method):
    check_deterministic(method, pm=PM)


@pytest.mark.parametrize("method", PRUNING)
def test_scores_do_not_depend_on_the_budget(method):
    """The score hook's contract: scores from a run at one budget, reused at another, give
    exactly the model a fresh run gives (``harness compare`` scores once per method)."""
    check_scores_reuse(method, pm=PM)


@pytest.mark.parametrize("method", METHODS)
def test_missing_calibration_is_an_error(method):
    check_needs(method, pm=PM)


def test_check_method_catches_a_budget_dependent_score(tmp_path):
    """The kit itself: a score stage that reads ctx.budget fails the contract, by name."""
    from tshrink import hookimpl
    from tshrink.spec import MethodSpec, Recipe, StageSpec
    from tshrink.units import UnitScores

    class Cheat:
        @hookimpl
        def tshrink_stages(self):
            return [StageSpec("score", "cheat")]

        @hookimpl
        def tshrink_methods(self):
            return [MethodSpec("cheat", Recipe(score="cheat", select="global"))]

        @hookimpl
        def tshrink_score(self, name, ctx, options):
            import torch

            g = torch.Generator().manual_seed(int(ctx.budget * 100))  # depends on the budget: forbidden
            return UnitScores([torch.rand(n, generator=g) for n in ctx.adapter.head_counts()],
                              [torch.rand(n, generator=g) for n in ctx.adapter.neuron_counts()])

    check_prune("cheat", "llama", plugins=[Cheat()], tmp_dir=tmp_path)  # the other clauses hold
    with pytest.raises(AssertionError, match=r"method 'cheat' breaks the tshrink contract: score reuse"):
        check_method("cheat", plugins=[Cheat()])
