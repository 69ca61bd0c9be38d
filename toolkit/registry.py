"""The method registry: stages and methods declared by the registered plugins.

Built once per plugin manager and validated then, so that one broken plugin is reported and
set aside instead of taking every method down:

- a stage declared by two plugins is used from neither (both named, ``--block`` suggested);
- a stage whose plugin does not implement the matching ``tshrink_<kind>`` hook is set aside;
- a method whose recipe names an unknown stage, whose ``defaults`` name an option none of its
  stages has, or whose stages declare the same option name differently, is listed as broken
  (``harness plugins``) with the reason and a "did you mean";
- plugins that failed to load (:func:`tshrink.manager.get_plugin_manager`) are listed too.

Each stage call is dispatched to the plugin that declared the stage (:meth:`Registry.stage_hook`).
Look-ups fail with "did you mean ..." and the full list, like timm / lm-eval registries.
"""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from .errors import BLOCK_HINT, PluginProblem
from .spec import STAGE_KINDS, MethodSpec, Option, Recipe, StageSpec


@dataclass(frozen=True)
class Source:
    """Where a declaration came from: plugin name, distribution and version."""

    plugin: str
    package: str
    version: str

    def __str__(self) -> str:
        return f"{self.plugin!r} ({self.package} {self.version})" if self.version != "-" else repr(self.plugin)

    @property
    def dist(self) -> str:
        """"package version", or "-" for a plugin registered directly (not installed)."""
        return f"{self.package} {self.version}" if self.version != "-" else "-"


@dataclass(frozen=True)
class Problem:
    """Something a plugin declared or shipped that cannot be used; the rest still works."""

    plugin: str
    package: str
    error: str

    def row(self) -> dict[str, str]:
        return {"plugin": self.plugin, "package": self.package, "problem": self.error}


def _did_you_mean(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(sorted(known)) or '(none)'}."


class Registry:
    """All stages and methods of a plugin manager, validated once."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.stages: dict[tuple[str, str], StageSpec] = {}
        self.methods: dict[str, MethodSpec] = {}
        self.stage_sources: dict[tuple[str, str], Source] = {}
        self.method_sources: dict[str, Source] = {}
        self.stage_plugins: dict[tuple[str, str], object] = {}  # the plugin object that answers a stage
        self.problems: list[Problem] = [Problem(*f) for f in getattr(pm, "load_failures", [])]
        #: stages set aside (declared twice, hook missing): (kind, name) -> reason
        self.set_aside: dict[tuple[str, str], str] = {}
        #: methods that cannot run: name -> reason (shown by ``harness plugins``)
        self.unavailable: dict[str, str] = {}
        self._dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
        self._collect_stages()
        self._collect_methods()

    # -- building -------------------------------------------------------------------
    def _source(self, impl: pluggy.HookImpl) -> Source:
        dist = self._dists.get(id(impl.plugin))
        if dist is not None:
            return Source(impl.plugin_name, dist.project_name, dist.version)
        return Source(impl.plugin_name, getattr(impl.plugin, "__name__", impl.plugin_name), "-")

    def _declared(self, hook: str, cls: type) -> list[tuple[Any, pluggy.HookImpl, Source]]:
        """Every declaration of ``hook`` (``tshrink_stages`` / ``tshrink_methods``), each plugin
        on its own: one that raises or returns something else is a problem, not a crash."""
        out = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            src = self._source(impl)
            try:
                decls = list(impl.function() or [])
            except Exception as err:  # noqa: BLE001 - reported, the other plugins go on
                self.problems.append(Problem(src.plugin, src.dist,
                                             f"{hook}() raised {type(err).__name__}: {err}"))
                continue
            for decl in decls:
                if not isinstance(decl, cls):
                    self.problems.append(Problem(src.plugin, src.dist,
                                                 f"{hook}() returned {decl!r}, not a {cls.__name__}"))
                    continue
                out.append((decl, impl, src))
        return out

    def _collect_stages(self) -> None:
        by_key: dict[tuple[str, str], list[tuple[StageSpec, pluggy.HookImpl, Source]]] = {}
        for decl, impl, src in self._declared("tshrink_stages", StageSpec):
            by_key.setdefault((decl.kind, decl.name), []).append((decl, impl, src))
        for key, decls in by_key.items():
            kind, name = key
            plugins = list(dict.fromkeys(src.plugin for _, _, src in decls))
            if len(decls) > 1:
                who = " and ".join(str(src) for _, _, src in decls)
                reason = (f"{kind} stage {name!r} is declared by both {who}; neither is used: "
                          + BLOCK_HINT.replace("NAME", plugins[-1]) if len(plugins) > 1 else
                          f"{kind} stage {name!r} is declared {len(decls)} times by {decls[0][2]}")
                self.set_aside[key] = reason
                for _, _, src in decls:
                    self.problems.append(Problem(src.plugin, src.dist, reason))
                continue
            decl, impl, src = decls[0]
            hook = getattr(self.pm.hook, f"tshrink_{kind}")
            if not any(i.plugin is impl.plugin for i in hook.get_hookimpls()):
                reason = (f"plugin {src} declares {kind} stage {name!r} but implements no "
                          f"tshrink_{kind} hook")
                self.set_aside[key] = reason
                self.problems.append(Problem(src.plugin, src.dist, reason))
                continue
            names = [o.name for o in decl.options]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                reason = f"{kind} stage {name!r} of plugin {src} declares option(s) {dup} more than once"
                self.set_aside[key] = reason
                self.problems.append(Problem(src.plugin, src.dist, reason))
                continue
            self.stages[key], self.stage_sources[key], self.stage_plugins[key] = decl, src, impl.plugin

    def _collect_methods(self) -> None:
        seen: dict[str, list[tuple[MethodSpec, Source]]] = {}
        for decl, _, src in self._declared("tshrink_methods", MethodSpec):
            seen.setdefault(decl.name, []).append((decl, src))
        for name, decls in seen.items():
            if len(decls) > 1:
                who = " and ".join(str(src) for _, src in decls)
                reason = (f"method {name!r} is declared by both {who}; neither is used: "
                          + BLOCK_HINT.replace("NAME", decls[-1][1].plugin))
                self.unavailable[name] = reason
                self.problems += [Problem(src.plugin, src.dist, reason) for _, src in decls]
                continue
            decl, src = decls[0]
            self.method_sources[name] = src
            try:
                self._check_method(decl)
            except ValueError as err:
                self.unavailable[name] = f"method {name!r} of plugin {src}: {err}"
                self.problems.append(Problem(src.plugin, src.dist, self.unavailable[name]))
                continue
            self.methods[name] = decl

    def _check_method(self, method: MethodSpec) -> None:
        """Raise ValueError if the recipe's stages are unknown, its stages' options clash, or
        its defaults name options none of its stages has."""
        for kind, name in method.recipe.stages():
            if (kind, name) in self.set_aside:
                raise ValueError(f"uses {kind} stage {name!r}, which is set aside: {self.set_aside[(kind, name)]}")
            if kind not in STAGE_KINDS or (kind, name) not in self.stages:
                known = [n for k, n in self.stages if k == kind]
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"uses {kind} stage {name!r}, which no loaded plugin declares (blocked or not "
                                 f"installed?).{hint} Known {kind} stages: {', '.join(sorted(known)) or '(none)'}.")
        opts = self._recipe_options(method.recipe)
        unknown = sorted(set(method.defaults) - set(opts))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(opts), n=1, cutoff=0.5)
                if close:
                    hints.append(f"{key!r} -> {close[0]!r}?")
            raise ValueError(f"defaults name option(s) {unknown} that none of its stages ({method.recipe}) has"
                             + (f" (did you mean {', '.join(hints)})" if hints else "")
                             + f"; its options are: {', '.join(sorted(opts)) or '(none)'}")
        for key, value in method.defaults.items():
            opts[key][0].parse(value)  # a default outside an option's choices fails now

    def _recipe_options(self, recipe: Recipe) -> dict[str, tuple[Option, str]]:
        """Option name -> (option, "kind stage 'name'"); ValueError if two stages of the recipe
        declare one name differently, or from different plugins (one value would set both)."""
        out: dict[str, tuple[Option, str]] = {}
        owner: dict[str, Source] = {}
        for kind, name in recipe.stages():
            src = self.stage_sources[(kind, name)]
            for opt in self.stages[(kind, name)].options:
                where = f"{kind} stage {name!r} of plugin {src.plugin!r}"
                if opt.name in out and (out[opt.name][0] != opt or owner[opt.name].plugin != src.plugin):
                    raise ValueError(
                        f"option {opt.name!r} is declared by both {out[opt.name][1]} and {where}: one value "
                        f"would set both. Option names must be unique across the stages of a recipe "
                        f"(prefix them with the plugin's name, e.g. '{src.plugin}_{opt.name}')")
                out.setdefault(opt.name, (opt, where))
                owner.setdefault(opt.name, src)
        return out

    # -- look-ups -----------------------------------------------------------------
    def stage(self, kind: str, name: str) -> StageSpec:
        if kind not in STAGE_KINDS:
            raise ValueError(f"stage kind {kind!r} is not one of {STAGE_KINDS}")
        if (kind, name) in self.set_aside:
            raise ValueError(self.set_aside[(kind, name)])
        if (kind, name) not in self.stages:
            raise ValueError(_did_you_mean(f"{kind} stage", name, [n for k, n in self.stages if k == kind])
                             + " (a plugin blocked or not installed?)")
        return self.stages[(kind, name)]

    def stage_hook(self, kind: str, name: str, hook: str | None = None) -> Any:
        """The ``tshrink_<kind>`` hook (or ``hook``, e.g. ``tshrink_restore`` for a transform
        stage) restricted to the plugin that declared the stage: a call reaches that plugin
        only, so another plugin's bugs cannot break this stage."""
        self.stage(kind, name)
        owner = self.stage_plugins[(kind, name)]
        others = [p for p in self.pm.get_plugins() if p is not owner]
        return self.pm.subset_hook_caller(hook or f"tshrink_{kind}", remove_plugins=others)

    def method(self, name: str) -> MethodSpec:
        """A registered method, or an ad-hoc one from a recipe string (``score=...,select=...``)."""
        if "=" in name:
            recipe = Recipe.parse(name)
            for kind, stage in recipe.stages():
                self.stage(kind, stage)
            spec = MethodSpec(name=str(recipe), recipe=recipe, description="ad-hoc recipe")
            self._check_method(spec)
            return spec
        if name in self.unavailable:
            raise ValueError(self.unavailable[name])
        if name not in self.methods:
            raise ValueError(_did_you_mean("method", name, list(self.methods)))
        return self.methods[name]

    def source(self, method: str) -> Source:
        return self.method_sources.get(method, Source("-", "-", "-"))

    def warn_problems(self, emit: Callable[[str], None] | None = None) -> None:
        """Emit one :class:`tshrink.errors.PluginProblem` warning per problem and plugin manager
        (commands other than ``harness plugins``, which lists them); ``emit(text)`` instead of
        a warning (the harness prints ``harness: warning: ...``)."""
        warned = self.pm.__dict__.setdefault("tshrink_warned", set())  # once per plugin manager
        for p in self.problems:
            if p in warned:
                continue
            warned.add(p)
            where = f"{p.plugin}, {p.package}" if p.package != "-" else p.plugin
            if emit is not None:
                emit(f"plugin problem ({where}): {p.error}")
                continue
            warnings.warn(f"tshrink plugin problem ({where}): {p.error}", PluginProblem,
                          stacklevel=2)

    # -- derived facts ------------------------------------------------------------
    def needs(self, recipe: Recipe) -> dict[str, bool]:
        specs = [self.stage(k, n) for k, n in recipe.stages()]
        return {
            "calibration": any(s.needs_calibration for s in specs),
            "gradients": any(s.needs_gradients for s in specs),
            "labels": any(s.needs_labels for s in specs),
        }

    def options(self, method: MethodSpec) -> dict[str, Option]:
        """All options of the method's stages (method defaults applied)."""
        out: dict[str, Option] = {}
        for name, (opt, _) in self._recipe_options(method.recipe).items():
            out[name] = Option(opt.name, method.defaults.get(opt.name, opt.default), opt.help, opt.choices)
        return out

    def stage_options(self, kind: str, name: str, resolved: dict[str, Any]) -> dict[str, Any]:
        """The part of a method's resolved options that stage ``kind``/``name`` declared."""
        return {o.name: resolved[o.name] for o in self.stage(kind, name).options if o.name in resolved}

    def resolve_options(self, method: MethodSpec, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``given``; unknown option names are an error."""
        known = self.options(method)
        unknown = [k for k in given if k not in known]
        if unknown:
            raise ValueError(
                f"method {method.name!r} has no option(s) {unknown}; its options are: "
                + (", ".join(f"{o.name}={o.default!r}" for o in known.values()) or "(none)")
            )
        return {k: (known[k].parse(given[k]) if k in given else o.default) for k, o in known.items()}

    def rows(self) -> list[dict[str, Any]]:
        """One row per method for listings: stages, needs, paper, source package/version;
        headline methods (run by ``harness compare`` without --methods) are marked."""
        rows = []
        for name in sorted(self.methods):
            m = self.methods[name]
            needs = self.needs(m.recipe)
            src = self.source(name)
            rows.append({
                "method": name,
                "headline": m.compare_by_default,
                "stages": str(m.recipe),
                "needs": ", ".join(k for k, v in needs.items() if v) or "-",
                "paper": m.paper or "-",
                "package": src.dist,
            })
        return rows

    def headline(self) -> list[str]:
        """The methods ``harness compare`` runs when no --methods are given."""
        return sorted(n for n, m in self.methods.items() if m.compare_by_default)


def get_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """The registry of ``pm`` (default: a fresh plugin manager with autoload)."""
    if pm is None:
        from .manager import get_plugin_manager

        pm = get_plugin_manager()
    return Registry(pm)
