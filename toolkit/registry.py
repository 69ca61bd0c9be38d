"""The method registry: stages and methods declared by the registered plugins.

Look-ups fail with "did you mean ..." and the full list, like timm / lm-eval registries.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import pluggy

from .spec import STAGE_KINDS, MethodSpec, Option, Recipe, StageSpec


@dataclass(frozen=True)
class Source:
    """Where a declaration came from: plugin name, distribution and version."""

    plugin: str
    package: str
    version: str


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
        dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}

        def source(impl: pluggy.HookImpl) -> Source:
            dist = dists.get(id(impl.plugin))
            if dist is not None:
                return Source(impl.plugin_name, dist.project_name, dist.version)
            return Source(impl.plugin_name, getattr(impl.plugin, "__name__", impl.plugin_name), "-")

        for impl in pm.hook.tshrink_stages.get_hookimpls():
            for decl in impl.function() or []:
                key = (decl.kind, decl.name)
                if key in self.stages:
                    raise ValueError(f"{decl.kind} stage {decl.name!r} declared by both "
                                     f"{self.stage_sources[key].plugin!r} and {impl.plugin_name!r}")
                self.stages[key], self.stage_sources[key] = decl, source(impl)
        for impl in pm.hook.tshrink_methods.get_hookimpls():
            for decl in impl.function() or []:
                if decl.name in self.methods:
                    raise ValueError(f"method {decl.name!r} declared by both "
                                     f"{self.method_sources[decl.name].plugin!r} and {impl.plugin_name!r}")
                self.methods[decl.name], self.method_sources[decl.name] = decl, source(impl)
        # A method whose stages are missing (a plugin blocked or not installed) is set aside with
        # the reason, so one broken recipe cannot take every other method down with it.
        self.unavailable: dict[str, str] = {}
        for method in list(self.methods.values()):
            for kind, name in method.recipe.stages():
                if (kind, name) not in self.stages:
                    self.unavailable[method.name] = (
                        f"method {method.name!r} (from {self.method_sources[method.name].plugin!r}) uses "
                        f"{kind} stage {name!r}, which no loaded plugin declares (blocked or not installed?)")
                    del self.methods[method.name]
                    break

    # -- look-ups -----------------------------------------------------------------
    def stage(self, kind: str, name: str) -> StageSpec:
        if kind not in STAGE_KINDS:
            raise ValueError(f"stage kind {kind!r} is not one of {STAGE_KINDS}")
        if (kind, name) not in self.stages:
            raise ValueError(_did_you_mean(f"{kind} stage", name, [n for k, n in self.stages if k == kind]))
        return self.stages[(kind, name)]

    def method(self, name: str) -> MethodSpec:
        """A registered method, or an ad-hoc one from a recipe string (``score=...,select=...``)."""
        if "=" in name:
            recipe = Recipe.parse(name)
            for kind, stage in recipe.stages():
                self.stage(kind, stage)
            return MethodSpec(name=str(recipe), recipe=recipe, description="ad-hoc recipe")
        if name in self.unavailable:
            raise ValueError(self.unavailable[name])
        if name not in self.methods:
            raise ValueError(_did_you_mean("method", name, list(self.methods)))
        return self.methods[name]

    def source(self, method: str) -> Source:
        return self.method_sources.get(method, Source("-", "-", "-"))

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
        for kind, name in method.recipe.stages():
            for opt in self.stage(kind, name).options:
                default = method.defaults.get(opt.name, opt.default)
                out[opt.name] = Option(opt.name, default, opt.help, opt.choices)
        return out

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
        """One row per method for listings: stages, needs, paper, source package/version."""
        rows = []
        for name in sorted(self.methods):
            m = self.methods[name]
            needs = self.needs(m.recipe)
            src = self.source(name)
            rows.append({
                "method": name,
                "stages": str(m.recipe),
                "needs": ", ".join(k for k, v in needs.items() if v) or "-",
                "paper": m.paper or "-",
                "package": f"{src.package} {src.version}",
            })
        return rows


def get_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """The registry of ``pm`` (default: a fresh plugin manager with autoload)."""
    if pm is None:
        from .manager import get_plugin_manager

        pm = get_plugin_manager()
    return Registry(pm)
