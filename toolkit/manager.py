"""The plugin-manager factory (the pluggy ``eggsample`` pattern).

Built-in methods are ordinary plugins, found through the same entry-point group
(``tshrink``) as third-party ones, so nothing here knows any method by name.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from types import ModuleType

import pluggy

from . import PROJECT, hookspecs

#: Environment switches, mirroring pytest's PYTEST_DISABLE_PLUGIN_AUTOLOAD.
ENV_NO_AUTOLOAD = "TSHRINK_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "TSHRINK_BLOCK_PLUGINS"  # comma-separated entry-point names


def get_plugin_manager(
    *,
    autoload: bool | None = None,
    block: Iterable[str] = (),
    plugins: Iterable[object | ModuleType] = (),
) -> pluggy.PluginManager:
    """Create a plugin manager with the hookspecs, entry-point plugins and ``plugins``.

    autoload: load every plugin of the ``tshrink`` entry-point group (built-ins included);
        default True unless the environment variable ``TSHRINK_DISABLE_PLUGIN_AUTOLOAD`` is set.
    block: entry-point / plugin names that must not be loaded (also ``TSHRINK_BLOCK_PLUGINS``).
    plugins: extra plugin objects or modules to register (tests, notebooks).

    Raises ``pluggy.PluginValidationError`` if a plugin implements a hook that does not
    exist (a misspelled ``tshrink_*`` function) or with a wrong signature.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set(block) | {b.strip() for b in os.environ.get(ENV_BLOCK, "").split(",") if b.strip()}
    for name in blocked:
        pm.set_blocked(name)
    if autoload is None:
        autoload = not os.environ.get(ENV_NO_AUTOLOAD)
    if autoload:
        pm.load_setuptools_entrypoints(PROJECT)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if not pm.is_blocked(name) and not pm.is_registered(plugin):
            pm.register(plugin, name=name)
    # Any function named tshrink_* that matches no hookspec is a typo: fail loudly.
    pm.check_pending()
    return pm
