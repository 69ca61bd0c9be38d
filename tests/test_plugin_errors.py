"""A failing or misbehaving plugin yields one error naming it and never breaks another
plugin's method (dispatch by owner, StageError, registry validation, isolated loading)."""
from __future__ import annotations

import pickle

import pytest
import torch

from conftest import tiny_batches, tiny_model
from tshrink import hookimpl
from tshrink.errors import PluginProblem, StageError
from tshrink.manager import get_plugin_manager
from tshrink.pipeline import prune
from tshrink.registry import Registry
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec
from tshrink.units import Selection, UnitScores


class Bad:
    """A third-party plugin with one score stage 'bad' and one select stage 'bad-select';
    ``mode`` says how it misbehaves. It never checks ``name`` first (a common bug)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.__name__ = "bad"

    @hookimpl
    def tshrink_stages(self):
        return [StageSpec("score", "bad", options=(Option("bad_alpha", 1.0),)), StageSpec("select", "bad-select")]

    @hookimpl
    def tshrink_methods(self):
        return [MethodSpec("bad", Recipe(score="bad", select="global")),
                MethodSpec("bad-select", Recipe(score="magnitude", select="bad-select"))]

    @hookimpl
    def tshrink_score(self, name, ctx, options):
        ctx.calib.n_tokens  # noqa: B018 - breaks on methods without calibration data, whoever owns them
        counts = ctx.adapter.head_counts(), ctx.adapter.neuron_counts()
        if self.mode == "raises":
            raise ValueError("boom")
        if self.mode == "none":
            return None
        if self.mode == "tuple":
            return ([torch.ones(n) for n in counts[0]], [torch.ones(n) for n in counts[1]])
        if self.mode == "lists":
            return UnitScores([[1.0] * n for n in counts[0]], [[1.0] * n for n in counts[1]])
        if self.mode == "short":
            return UnitScores([torch.ones(n) for n in counts[0]][:-1], [torch.ones(n) for n in counts[1]])
        return UnitScores([torch.ones(n) for n in counts[0]], [torch.ones(n) for n in counts[1]])

    @hookimpl
    def tshrink_select(self, name, ctx, scores, options):
        return Selection.full(ctx.adapter.head_counts(), ctx.adapter.neuron_counts())  # ignores the budget


def _run(method, mode, calib=True):
    pm = get_plugin_manager(plugins=[Bad(mode)])
    model = tiny_model("llama", head="causal-lm")
    return prune(model, method, 0.6, calib=tiny_batches("llama") if calib else None, pm=pm)


@pytest.mark.parametrize("mode, reason", [
    ("raises", r"ValueError: boom"),
    ("none", r"returned None for its own score stage 'bad'"),
    ("tuple", r"returned a tuple, expected a UnitScores"),
    ("lists", r"its UnitScores fails the host's check: AttributeError: 'list' object has no attribute 'shape'"),
    ("short", r"its UnitScores fails the host's check: scores.heads: 2 layers, the model has 3"),
])
def test_failing_score_stage_names_its_plugin(mode, reason):
    with pytest.raises(StageError, match=r"score stage 'bad' of plugin 'bad' failed in method 'bad' at budget "
                       r"0.6: " + reason) as info:
        _run("bad", mode)
    err = info.value
    assert (err.kind, err.stage, err.plugin, err.method, err.budget) == ("score", "bad", "bad", "bad", 0.6)
    if mode == "raises":
        assert isinstance(err.__cause__, ValueError) and err.__cause__.__traceback__ is not None
        assert isinstance(err, ValueError)  # a plugin refusing its input stays a ValueError (bad input)
    else:
        assert not isinstance(err, ValueError)  # a plugin bug, not the user's input
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.plugin == "bad"


def test_over_budget_selection_names_its_plugin():
    with pytest.raises(StageError, match=r"select stage 'bad-select' of plugin 'bad'.*over the budget 0.6"):
        _run("bad-select", "ok")


def test_misbehaving_plugin_never_breaks_another_plugins_method():
    # Bad's hooks would crash on any call (ctx.calib is None here); magnitude never reaches them
    for mode in ("raises", "none", "tuple"):
        res = _run("magnitude", mode, calib=False)
        assert res.report["flops_kept"] <= 0.6
    # the built-in selector also works after a plugin's score stage (each call goes to its owner)
    assert _run("bad", "ok").report["flops_kept"] <= 0.6


def test_failing_builtin_stage_is_a_stage_error(monkeypatch):
    import tshrink_plugins.magnitude.plugin as magnitude

    monkeypatch.setattr("tshrink_plugins.magnitude.scores.head_scores", lambda *a: 1 / 0)
    with pytest.raises(StageError, match=r"score stage 'magnitude' of plugin 'magnitude' \(tshrink 0.1.0\)"
                       r".*ZeroDivisionError") as info:
        prune(tiny_model("bert"), "magnitude", 0.5)
    assert info.value.package == "tshrink" and magnitude


def test_unknown_default_key_and_option_clash_are_rejected_at_registration():
    class Sloppy:
        @hookimpl
        def tshrink_stages(self):
            return [StageSpec("correct", "fix", options=(Option("norm", "l1"),))]

        @hookimpl
        def tshrink_correct(self, name, ctx, selection, options):
            return selection

        @hookimpl
        def tshrink_methods(self):
            return [MethodSpec("typo", Recipe(score="stat", select="stat-allocate", correct=("stat",)),
                               defaults={"stat_repik": False}),
                    MethodSpec("clash", Recipe(score="magnitude", select="global", correct=("fix",))),
                    MethodSpec("lost", Recipe(score="magnitud", select="global"))]

    reg = Registry(get_plugin_manager(plugins=[Sloppy()]))
    assert not {"typo", "clash", "lost"} & set(reg.methods) and "stat" in reg.methods
    with pytest.raises(ValueError, match=r"method 'typo' of plugin 'Sloppy'.*\['stat_repik'\].*"
                       r"did you mean 'stat_repik' -> 'stat_repick'"):
        reg.method("typo")
    with pytest.raises(ValueError, match=r"method 'clash' of plugin 'Sloppy'.*option 'norm' is declared by both "
                       r"score stage 'magnitude' of plugin 'magnitude' and correct stage 'fix' of plugin 'Sloppy'"):
        reg.method("clash")
    with pytest.raises(ValueError, match=r"'lost'.*score stage 'magnitud'.*Did you mean 'magnitude'"):
        reg.method("lost")
    assert {p.plugin for p in reg.problems} == {"Sloppy"} and len(reg.problems) == 3
    with pytest.warns(PluginProblem) as caught:
        reg.warn_problems()
    mine = [str(w.message) for w in caught if w.category is PluginProblem]
    assert len(mine) == 3 and "stat_repik" in mine[0]
    # the same checks hold for ad-hoc recipes
    with pytest.raises(ValueError, match="option 'norm' is declared by both"):
        reg.method("score=magnitude,select=global,correct=fix")


def test_stage_without_its_hook_is_set_aside():
    class Half:
        @hookimpl
        def tshrink_stages(self):
            return [StageSpec("score", "half")]

        @hookimpl
        def tshrink_methods(self):
            return [MethodSpec("half", Recipe(score="half", select="global"))]

    reg = Registry(get_plugin_manager(plugins=[Half()]))
    with pytest.raises(ValueError, match="declares score stage 'half' but implements no tshrink_score hook"):
        reg.method("half")
    assert "magnitude" in reg.methods


def test_declaration_hook_that_raises_is_a_problem_not_a_crash():
    class Crashing:
        @hookimpl
        def tshrink_methods(self):
            raise RuntimeError("no config file")

    reg = Registry(get_plugin_manager(plugins=[Crashing()]))
    assert "magnitude" in reg.methods
    assert [p.error for p in reg.problems] == ["tshrink_methods() raised RuntimeError: no config file"]


def _fake_distribution(root, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """An installed-looking distribution 'tshrink-fake 9.9' under ``root`` (put it on sys.path)."""
    info = root / "tshrink_fake-9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tshrink-fake\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text("[tshrink]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for name, code in modules.items():
        (root / f"{name}.py").write_text(code)


@pytest.fixture
def broken_entry_points(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, {"broken": "tshrink_fake_broken", "missing": "tshrink_fake_missing",
                                  "typo": "tshrink_fake_typo", "badsig": "tshrink_fake_badsig"},
                       {"tshrink_fake_broken": "import numpy\nraise ImportError('needs libfoo.so')\n",
                        "tshrink_fake_typo": "from tshrink import hookimpl\n@hookimpl\n"
                                             "def tshrink_scroe(name, ctx, options):\n    return None\n",
                        "tshrink_fake_badsig": "from tshrink import hookimpl\n@hookimpl\n"
                                               "def tshrink_score(name, ctx, options, extra):\n    return None\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("tshrink_fake_broken", "tshrink_fake_missing", "tshrink_fake_typo", "tshrink_fake_badsig"):
        monkeypatch.delitem(__import__("sys").modules, mod, raising=False)


def test_broken_entry_point_is_reported_and_the_rest_works(broken_entry_points):
    pm = get_plugin_manager()
    failures = {name: (package, error) for name, package, error in pm.load_failures}
    assert set(failures) == {"broken", "missing", "typo", "badsig"}
    assert failures["broken"][0] == "tshrink-fake 9.9"
    assert "ImportError: needs libfoo.so" in failures["broken"][1] and "--block broken" in failures["broken"][1]
    assert "ModuleNotFoundError" in failures["missing"][1] and "TSHRINK_BLOCK_PLUGINS=missing" in failures["missing"][1]
    assert "tshrink_scroe" in failures["typo"][1] and pm.get_plugin("typo") is None
    assert "cannot register" in failures["badsig"][1] and "extra" in failures["badsig"][1]
    assert pm.get_plugin("badsig") is None
    assert all(i.plugin_name != "badsig" for i in pm.hook.tshrink_score.get_hookimpls())
    reg = Registry(pm)
    assert {"magnitude", "stat", "fisher"} <= set(reg.methods)
    assert {p.plugin for p in reg.problems} == {"broken", "missing", "typo", "badsig"}
    with pytest.warns(PluginProblem) as caught:
        prune(tiny_model("bert"), "magnitude", 0.5, pm=pm)
    mine = [str(w.message) for w in caught if w.category is PluginProblem]
    assert len(mine) == 4 and any("(broken, tshrink-fake 9.9): cannot import" in m for m in mine)
    # blocked by name (argument or environment): not even imported, so not reported
    assert get_plugin_manager(block=["broken", "missing", "typo", "badsig"]).load_failures == []


def test_harness_plugins_lists_broken_entry_points(broken_entry_points, monkeypatch, capsys):
    from tshrink_harness.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "magnitude *" in out and "4 problem(s)" in out and "needs libfoo.so" in out and "tshrink-fake 9.9" in out
    monkeypatch.setenv("TSHRINK_BLOCK_PLUGINS", "broken,missing,badsig")
    assert main(["plugins", "--block", "typo"]) == 0
    out = capsys.readouterr().out
    assert "problem" not in out and "magnitude *" in out


def test_builtins_report_progress_through_ctx_track(capsys):
    model = tiny_model("llama", head="causal-lm")
    prune(model, "stat", 0.6, calib=tiny_batches("llama"), progress=True)
    err = capsys.readouterr().err
    assert "score:stat layers" in err and "correct:stat layers" in err and "/3 [" in err  # a bar over the 3 layers
    prune(tiny_model("llama", head="causal-lm"), "stat", 0.6, calib=tiny_batches("llama"))
    assert capsys.readouterr().err == ""  # silent unless asked


def test_harness_prune_block_silences_broken_entry_points(broken_entry_points, tmp_path, monkeypatch, capsys):
    import warnings

    from tshrink.testing import tiny_model_dir
    from tshrink_harness.cli import main

    monkeypatch.delenv("TSHRINK_BLOCK_PLUGINS", raising=False)  # restored after the test
    model_dir = tiny_model_dir("llama", tmp_path)
    args = ["prune", "--method", "magnitude", "--model", str(model_dir), "--flops", "0.6", "--calib-samples", "4",
            "--seq-len", "16"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginProblem)  # the harness prints them instead
        assert main(args + ["--output", str(tmp_path / "a")]) == 0
    mine = [line for line in capsys.readouterr().err.splitlines() if line.startswith("harness: warning: plugin")]
    assert len(mine) == 4 and any("needs libfoo.so" in m for m in mine)  # once each
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginProblem)
        assert main(args + ["--output", str(tmp_path / "b"), "--block", "broken", "--block", "missing",
                            "--block", "typo", "--block", "badsig"]) == 0
    assert "harness: warning" not in capsys.readouterr().err


def test_duplicate_method_names_set_both_aside():
    class Twin:
        @hookimpl
        def tshrink_methods(self):
            return [MethodSpec("magnitude", Recipe(score="magnitude", select="uniform"))]

    reg = Registry(get_plugin_manager(plugins=[Twin()]))
    with pytest.raises(ValueError, match=r"method 'magnitude' is declared by both 'magnitude' \(tshrink .*\) and "
                       r"'Twin'.*--block Twin"):
        reg.method("magnitude")
    assert "magnitude-uniform" in reg.methods
    assert [p.plugin for p in reg.problems] == ["magnitude", "Twin"]


def test_restore_goes_to_the_plugin_that_declared_the_transform(tmp_path):
    from tshrink.checkpoint import load_pruned, save_pruned

    class Grabby:  # would claim every compact form if asked
        @hookimpl
        def tshrink_restore(self, name, model, tensors, meta):
            raise RuntimeError("not mine")

    model = tiny_model("bert")
    res = prune(model, "kmeans", 1.0, options={"quant_bits": 2})
    save_pruned(model, tmp_path / "m", compressed=res.compressed)
    batch = tiny_batches("bert").batches[0]
    again = load_pruned(tmp_path / "m", pm=get_plugin_manager(plugins=[Grabby()]))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).last_hidden_state, model(**batch).last_hidden_state)
    with pytest.raises(ValueError, match="no loaded plugin declares transform stage 'kmeans'"):
        load_pruned(tmp_path / "m", pm=get_plugin_manager(block=["quant"]))


class EveryKind:
    """One broken stage of every kind, each behind the built-in magnitude scorer/selector."""

    @hookimpl
    def tshrink_stages(self):
        return [StageSpec("select", "x-select"), StageSpec("refine", "x-refine"), StageSpec("correct", "x-widen"),
                StageSpec("transform", "x-transform")]

    @hookimpl
    def tshrink_methods(self):
        return [MethodSpec("x-select", Recipe(score="magnitude", select="x-select")),
                MethodSpec("x-refine", Recipe(score="magnitude", select="global", refine=("x-refine",))),
                MethodSpec("x-widen", Recipe(score="magnitude", select="global", correct=("x-widen",))),
                MethodSpec("x-transform", Recipe(transform=("x-transform",)))]

    @hookimpl
    def tshrink_select(self, name, ctx, scores, options):
        raise KeyError("no such layer")

    @hookimpl
    def tshrink_refine(self, name, ctx, scores, selection, options):
        return selection.heads, selection.neurons

    @hookimpl
    def tshrink_correct(self, name, ctx, selection, options):
        return Selection.full(ctx.adapter.head_counts(), ctx.adapter.neuron_counts())

    @hookimpl
    def tshrink_transform(self, name, ctx, options):
        return None


@pytest.mark.parametrize("method, kind, reason", [
    ("x-select", "select", "KeyError: 'no such layer'"),
    ("x-refine", "refine", "returned a tuple, expected a Selection"),
    ("x-widen", "correct", "may only narrow layers; it widened them"),
    ("x-transform", "transform", "returned None for its own transform stage 'x-transform'"),
])
def test_every_stage_kind_names_its_plugin(method, kind, reason):
    pm = get_plugin_manager(plugins=[EveryKind()])
    with pytest.raises(StageError, match=f"{kind} stage '{method}' of plugin 'EveryKind' failed in method "
                       f"'{method}' at budget 0.6: .*{reason}") as info:
        prune(tiny_model("bert"), method, 0.6, pm=pm)
    assert (info.value.kind, info.value.stage) == (kind, method)
    assert prune(tiny_model("bert"), "magnitude", 0.6, pm=pm).report["flops_kept"] <= 0.6  # the rest works
