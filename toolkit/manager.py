"""The plugin-manager factory (the pluggy ``eggsample`` pattern).

Built-in methods are ordinary plugins, found through the same entry-point group
(``tshrink``) as third-party ones, so nothing here knows any method by name.

Entry-point plugins are loaded one by one: a plugin that fails to import, to register (a
hook with a wrong signature) or whose ``tshrink_*`` function matches no hookspec is left
out and recorded in ``pm.load_failures`` as ``(name, package, error)``; the others keep
working. :class:`tshrink.registry.Registry` lists these next to its own problems.
"""
from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable
from types import ModuleType

import pluggy

from . import PROJECT, hookspecs
from .errors import BLOCK_HINT

#: Environment switches, mirroring pytest's PYTEST_DISABLE_PLUGIN_AUTOLOAD.
ENV_NO_AUTOLOAD = "TSHRINK_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "TSHRINK_BLOCK_PLUGINS"  # comma-separated entry-point names


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Names of ``plugin``'s hook implementations that match no hookspec (typos)."""
    out = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.spec is None and not any(i.optionalhook for i in caller.get_hookimpls() if i.plugin is plugin):
            out.append(caller.name)
    return out


def load_entry_points(pm: pluggy.PluginManager, group: str = PROJECT) -> list[tuple[str, str, str]]:
    """Load every plugin of the entry-point ``group`` on its own; returns the failures as
    ``(entry-point name, "package version", error)`` and records them in ``pm.load_failures``."""
    failures: list[tuple[str, str, str]] = getattr(pm, "load_failures", [])
    pm.load_failures = failures  # type: ignore[attr-defined]
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != group or pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            package = f"{dist.metadata['name']} {dist.version}"
            hint = BLOCK_HINT.replace("NAME", ep.name)
            try:
                plugin = ep.load()
            except Exception as err:  # noqa: BLE001 - any import error: reported, the rest goes on
                failures.append((ep.name, package, f"cannot import {ep.value!r}: {type(err).__name__}: {err} "
                                 f"({hint})"))
                continue
            try:
                pm.register(plugin, name=ep.name)
            except Exception as err:  # noqa: BLE001 - e.g. pluggy.PluginValidationError
                if pm.is_registered(plugin):
                    pm.unregister(plugin)
                failures.append((ep.name, package, f"cannot register {ep.value!r}: {' '.join(str(err).split())} "
                                 f"({hint})"))
                continue
            typos = _unknown_hooks(pm, plugin)
            if typos:
                pm.unregister(plugin)
                failures.append((ep.name, package, f"implements {typos}, which match no tshrink hook "
                                 f"(misspelled?) ({hint})"))
                continue
            pm._plugin_distinfo.append((plugin, pluggy._manager.DistFacade(dist)))  # as pluggy's own loader does
    return failures


def get_plugin_manager(
    *,
    autoload: bool | None = None,
    block: Iterable[str] = (),
    plugins: Iterable[object | ModuleType] = (),
) -> pluggy.PluginManager:
    """Create a plugin manager with the hookspecs, entry-point plugins and ``plugins``.

    autoload: load every plugin of the ``tshrink`` entry-point group (built-ins included);
        default True unless the environment variable ``TSHRINK_DISABLE_PLUGIN_AUTOLOAD`` is set.
        A plugin that fails to load is left out and recorded in ``pm.load_failures``.
    block: entry-point / plugin names that must not be loaded (also ``TSHRINK_BLOCK_PLUGINS``).
    plugins: extra plugin objects or modules to register (tests, notebooks).

    Raises ``pluggy.PluginValidationError`` if one of ``plugins`` implements a hook that does
    not exist (a misspelled ``tshrink_*`` function) or with a wrong signature.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_failures = []  # type: ignore[attr-defined]
    blocked = set(block) | {b.strip() for b in os.environ.get(ENV_BLOCK, "").split(",") if b.strip()}
    for name in blocked:
        pm.set_blocked(name)
    if autoload is None:
        autoload = not os.environ.get(ENV_NO_AUTOLOAD)
    if autoload:
        load_entry_points(pm)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if not pm.is_blocked(name) and not pm.is_registered(plugin):
            pm.register(plugin, name=name)
    # Any function named tshrink_* that matches no hookspec is a typo: fail loudly.
    pm.check_pending()
    return pm
