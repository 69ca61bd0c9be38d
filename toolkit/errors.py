"""Errors that name their source: which stage of which plugin (package, version) failed,
in which method and at which budget, with the plugin's own exception kept as ``__cause__``.

Import-cheap (no torch): the harness catches these around every method it runs.
"""
from __future__ import annotations

from typing import Any

BLOCK_HINT = "block it with `--block NAME` or TSHRINK_BLOCK_PLUGINS=NAME"


class StageError(Exception):
    """A stage call failed: the plugin raised, returned nothing for its own stage, returned the
    wrong type or shape, or broke a host check (budget, widths).

    Attributes: ``kind`` (``"score"``, ``"select"``, ``"refine"``, ``"correct"``, ``"remove"``,
    ``"transform"``), ``stage`` (the stage name), ``plugin`` / ``package`` / ``version`` (who
    declared the stage), ``method``, ``budget`` and ``reason`` (what went wrong). The original
    exception, if any, is ``__cause__`` (its traceback is kept).
    """

    def __init__(self, reason: str, *, kind: str, stage: str, plugin: str = "-", package: str = "-",
                 version: str = "-", method: str | None = None, budget: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.stage = reason, kind, stage
        self.plugin, self.package, self.version = plugin, package, version
        self.method, self.budget = method, budget

    def __str__(self) -> str:
        where = f"{self.kind} stage {self.stage!r} of plugin {self.plugin!r}"
        if self.version != "-":  # installed as a distribution (else registered directly, e.g. in a test)
            where += f" ({self.package} {self.version})"
        run = f"method {self.method!r}" if self.method is not None else "an ad-hoc call"
        if self.budget is not None:
            run += f" at budget {self.budget:g}"
        return f"{where} failed in {run}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (multiprocessing, pytest-xdist)
        return (_rebuild, (type(self), self.reason, self.as_dict()))

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready data (for failure records)."""
        return {"kind": self.kind, "stage": self.stage, "plugin": self.plugin, "package": self.package,
                "version": self.version, "method": self.method, "budget": self.budget, "reason": self.reason}


class StageValueError(StageError, ValueError):
    """A StageError whose cause is a ValueError: the plugin refused its input (an option value,
    missing calibration data), so code that catches ``ValueError`` as bad input still does."""


def stage_error(reason: str, cause: BaseException | None = None, **fields: Any) -> StageError:
    """A :class:`StageError`, or a :class:`StageValueError` when ``cause`` is a ValueError."""
    cls = StageValueError if isinstance(cause, ValueError) and not isinstance(cause, StageError) else StageError
    return cls(reason, **fields)


def _rebuild(cls: type, reason: str, fields: dict[str, Any]) -> StageError:
    fields = {k: v for k, v in fields.items() if k != "reason"}
    return cls(reason, **fields)


class PluginProblem(Warning):
    """A plugin that could not be used (failed to import, declared a clashing stage, a broken
    method): reported by ``harness plugins`` and as a warning elsewhere; the other plugins work."""
