"""Declarations a plugin makes about itself: stages, methods, options (plain data).

A *stage* is one implementation of one hook (kind) under a name, e.g. the ``score`` stage
``magnitude``. A *method* is a named :class:`Recipe` of stages plus option defaults, so a
"Fisher scores + STAT correction" variant is a recipe, not new code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STAGE_KINDS = ("score", "select", "refine", "correct", "transform")


@dataclass(frozen=True)
class Option:
    """One option of a stage: ``--opt name=value`` on the command line."""

    name: str
    default: Any
    help: str = ""
    choices: tuple | None = None

    def parse(self, raw: Any) -> Any:
        """Convert ``raw`` (often a string from the CLI) to the type of the default."""
        value = raw
        if isinstance(raw, str) and not isinstance(self.default, str) and self.default is not None:
            kind = type(self.default)
            try:
                if kind is bool:
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    value = raw.lower() in ("1", "true", "yes")
                else:
                    value = kind(raw)
            except ValueError:
                raise ValueError(
                    f"option {self.name!r}: cannot read {raw!r} as {kind.__name__}"
                ) from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"option {self.name!r}: {value!r} is not one of {list(self.choices)}")
        return value


@dataclass(frozen=True)
class StageSpec:
    """One stage implementation that a plugin provides."""

    kind: str  # one of STAGE_KINDS
    name: str
    description: str = ""
    needs_calibration: bool = False
    needs_gradients: bool = False
    needs_labels: bool = False
    options: tuple[Option, ...] = ()
    paper: str | None = None
    #: select stages: what the budget is a fraction of. "flops": the host checks the selection
    #: against the FLOPs budget; "latency": the stage meets (and checks) a latency budget itself
    budget: str = "flops"

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r}: kind {self.kind!r} is not one of {STAGE_KINDS}")
        if self.budget not in ("flops", "latency"):
            raise ValueError(f"stage {self.name!r}: budget {self.budget!r} is not 'flops' or 'latency'")


@dataclass(frozen=True)
class Recipe:
    """Which stage runs at each step; ``None`` / empty means the step is skipped.

    Text form (accepted wherever a method name is): ``score=fisher,select=fisher-search,
    refine=fisher-rearrange,correct=stat`` (repeat a key or join with ``+`` for several).
    """

    score: str | None = None
    select: str | None = None
    refine: tuple[str, ...] = ()
    correct: tuple[str, ...] = ()
    transform: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # removal runs score -> select -> refine* -> correct*: the steps come as a chain
        if self.select and not self.score:
            raise ValueError(f"recipe {self}: a 'select' stage needs a 'score' stage")
        if (self.score or self.refine or self.correct) and not self.select:
            raise ValueError(f"recipe {self}: 'score', 'refine' and 'correct' stages need a 'select' stage "
                             "(e.g. select=global)")

    def stages(self) -> list[tuple[str, str]]:
        """(kind, name) of every stage, in execution order."""
        out = [("score", self.score)] if self.score else []
        out += [("select", self.select)] if self.select else []
        out += [("refine", n) for n in self.refine] + [("correct", n) for n in self.correct]
        return out + [("transform", n) for n in self.transform]

    @property
    def prunes(self) -> bool:
        return self.select is not None

    def __str__(self) -> str:
        parts = [f"{kind}={name}" for kind, name in self.stages()]
        return ",".join(parts) or "(dense)"

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        fields: dict[str, Any] = {"refine": [], "correct": [], "transform": []}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in STAGE_KINDS or not value.strip():
                raise ValueError(
                    f"recipe part {part!r} is not 'kind=stage' with kind one of {STAGE_KINDS}"
                )
            names = [v.strip() for v in value.split("+") if v.strip()]
            if key in ("score", "select"):
                if key in fields or len(names) != 1:
                    raise ValueError(f"recipe {text!r}: '{key}' takes exactly one stage")
                fields[key] = names[0]
            else:
                fields[key] += names
        for key in ("refine", "correct", "transform"):
            fields[key] = tuple(fields[key])
        return cls(**fields)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MethodSpec:
    """A named method: a recipe of stages plus option defaults and provenance."""

    name: str
    recipe: Recipe
    description: str = ""
    paper: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    #: shown by ``harness compare`` when no --methods are given (the headline methods)
    compare_by_default: bool = False
