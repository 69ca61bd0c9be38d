"""tshrink: compress trained transformers without retraining.

The host is a pluggy project: methods are plugins that implement the stage hooks in
:mod:`tshrink.hookspecs`. This module stays import-cheap (no torch) so that listing
plugins and ``harness --help`` are instant; heavy modules are imported where used.
"""
import pluggy

__version__ = "0.1.0"
PROJECT = "tshrink"  # pluggy project name and entry-point group

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "hookspec", "PROJECT", "__version__"]
