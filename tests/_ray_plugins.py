"""Test plugins for the Ray executor, importable by Ray workers (tests/ is on their PYTHONPATH)."""
from __future__ import annotations

import os
from pathlib import Path

from tshrink import hookimpl
from tshrink.spec import MethodSpec, Option, Recipe, StageSpec


class Misbehaving:
    """Correct stages that raise (``raiser``) or kill their own process: ``dies`` once (while the marker
    file of its option is absent; it is created first), ``dies-always`` every time."""

    @hookimpl
    def tshrink_stages(self):
        return [StageSpec("correct", "raiser"), StageSpec("correct", "dies-always"),
                StageSpec("correct", "dies", options=(Option("dies_marker", "", "file: die only while absent"),))]

    @hookimpl
    def tshrink_methods(self):
        base = {"score": "magnitude", "select": "global"}
        return [MethodSpec("raises", Recipe(**base, correct=("raiser",))),
                MethodSpec("dies", Recipe(**base, correct=("dies",))),
                MethodSpec("dies-always", Recipe(**base, correct=("dies-always",)))]

    @hookimpl
    def tshrink_correct(self, name, ctx, selection, options):
        if name == "raiser":
            raise RuntimeError("this method always fails")
        if name == "dies-always":
            os._exit(1)
        if name != "dies":
            return None
        marker = Path(options["dies_marker"])
        if not marker.exists():
            marker.write_text("died once\n")
            os._exit(1)
        return selection


plugin = Misbehaving()
