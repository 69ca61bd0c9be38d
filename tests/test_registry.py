"""The plugin host: manager factory, registry look-ups, recipes."""
from __future__ import annotations

import pluggy
import pytest

from tshrink import hookimpl
from tshrink.manager import get_plugin_manager
from tshrink.registry import Registry
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec


def test_builtins_load_through_entry_points():
    reg = Registry(get_plugin_manager())
    assert {"magnitude", "magnitude-uniform", "magnitude-unstructured"} <= set(reg.methods)
    src = reg.source("magnitude")
    assert src.package == "tshrink" and src.version != "-"


def test_autoload_off_and_blocking(monkeypatch):
    assert Registry(get_plugin_manager(autoload=False)).methods == {}
    reg = Registry(get_plugin_manager(block=["magnitude"]))
    assert "magnitude" not in reg.methods and ("global" not in {n for _, n in reg.stages})
    monkeypatch.setenv("TSHRINK_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert Registry(get_plugin_manager()).methods == {}


def test_blocked_dependency_sets_dependent_method_aside():
    import tshrink_plugins.magnitude.plugin as magnitude

    class Dependent:  # a third-party method reusing the built-in 'global' selector
        @hookimpl
        def tshrink_stages(self):
            return [StageSpec("score", "mine")]

        @hookimpl
        def tshrink_methods(self):
            return [MethodSpec("mine", Recipe(score="mine", select="global"))]

        @hookimpl
        def tshrink_score(self, name, ctx, options):
            return None

    ok = Registry(get_plugin_manager(autoload=False, plugins=[magnitude, Dependent()]))
    assert "mine" in ok.methods
    reg = Registry(get_plugin_manager(autoload=False, plugins=[Dependent()]))
    assert "mine" not in reg.methods
    with pytest.raises(ValueError, match="'mine'.*select stage 'global'.*blocked or not installed"):
        reg.method("mine")


def test_misspelled_hook_is_caught():
    class Typo:
        @hookimpl
        def tshrink_scroe(self, name, ctx, options):  # misspelled on purpose
            return None

    with pytest.raises(pluggy.PluginValidationError, match="tshrink_scroe"):
        get_plugin_manager(autoload=False, plugins=[Typo()])


def test_unknown_method_did_you_mean():
    reg = Registry(get_plugin_manager())
    with pytest.raises(ValueError, match=r"unknown method 'magnitud'\. Did you mean 'magnitude'.*Known methods:"):
        reg.method("magnitud")
    with pytest.raises(ValueError, match="unknown select stage 'globl'.*'global'"):
        reg.method("score=magnitude,select=globl")


def test_recipe_parse_roundtrip_and_errors():
    r = Recipe.parse("score=magnitude, select=global, refine=a+b, correct=c")
    assert r == Recipe("magnitude", "global", ("a", "b"), ("c",))
    assert Recipe.parse(str(r)) == r
    for bad in ("score", "scorez=x", "select=global", "score=a,score=b"):
        with pytest.raises(ValueError):
            Recipe.parse(bad)
    # removal stages without a selector would be silently skipped: refused instead, in code too
    for bad in ("correct=stat", "score=magnitude", "refine=fisher-rearrange,transform=kmeans"):
        with pytest.raises(ValueError, match="need a 'select' stage"):
            Recipe.parse(bad)
    with pytest.raises(ValueError, match="need a 'select' stage"):
        Recipe(correct=("stat",))


def test_duplicate_stage_sets_aside_only_that_stage():
    class Clash:
        @hookimpl
        def tshrink_stages(self):
            return [StageSpec("score", "magnitude")]

        @hookimpl
        def tshrink_score(self, name, ctx, options):
            return None

    reg = Registry(get_plugin_manager(plugins=[Clash()]))
    # the methods using the clashing stage are set aside with both plugins named ...
    assert "magnitude" not in reg.methods and "magnitude-uniform" not in reg.methods
    with pytest.raises(ValueError, match=r"score stage 'magnitude' is declared by both 'magnitude' \(tshrink .*\) "
                       r"and 'Clash'.*--block Clash"):
        reg.method("magnitude")
    # ... and every other method still works, the clashing plugins' other stages included
    assert {"stat", "fisher", "magnitude-unstructured"} <= set(reg.methods)
    assert ("select", "global") in reg.stages
    assert [p.plugin for p in reg.problems if p.error.startswith("score stage")] == ["magnitude", "Clash"]


def test_method_using_undeclared_stage_is_rejected():
    class Broken:
        @hookimpl
        def tshrink_methods(self):
            return [MethodSpec("broken", Recipe(score="nope", select="global"))]

    reg = Registry(get_plugin_manager(plugins=[Broken()]))
    assert "broken" not in reg.methods and "magnitude" in reg.methods
    with pytest.raises(ValueError, match="'broken'.*uses score stage 'nope'"):
        reg.method("broken")


def test_options_resolve_and_reject_unknown():
    reg = Registry(get_plugin_manager())
    spec = reg.method("magnitude")
    assert reg.resolve_options(spec, {"norm": "l1"})["norm"] == "l1"
    with pytest.raises(ValueError, match="no option.*'nrom'.*norm='l2'"):
        reg.resolve_options(spec, {"nrom": "l1"})
    with pytest.raises(ValueError, match="not one of"):
        reg.resolve_options(spec, {"norm": "l3"})
    assert Option("x", 3).parse("4") == 4 and Option("b", False).parse("true") is True
