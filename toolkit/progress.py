"""Progress reporting for long loops (``ctx.track``), importable by pure-math modules.

A stage passes ``ctx.track`` down to its helpers; helpers take a ``track`` argument that
defaults to :func:`untracked`, so they run silently when called on their own.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
Track = Callable[..., Iterable[Any]]  # track(iterable, desc="", total=None) -> iterable


def untracked(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
    """No progress bar: ``iterable`` unchanged."""
    return iterable


def tracked(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar on stderr (count, rate, ETA); removed when done."""
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, desc=desc or None, total=total, leave=False, dynamic_ncols=True)


def note(bar: Iterable[Any], text: str) -> None:
    """Show ``text`` after a progress bar's counts (e.g. which pass of a layer runs now); nothing
    for an untracked iterable."""
    set_postfix = getattr(bar, "set_postfix_str", None)
    if set_postfix is not None:
        set_postfix(text)
