"""A text source that every machine has: the Python documentation shipped with CPython.

``pydoc_data.topics`` holds the language reference's help topics (about 0.8 MB of English
prose with code); it is what the README's main job calibrates and evaluates on when no
data directory is given. The topics are split deterministically (sorted by name, every
fifth one held out) into a calibration part and an evaluation part.
"""
from __future__ import annotations


def _topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a trimmed Python without pydoc_data: fall back to module docstrings
        import importlib

        names = ["abc", "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "decimal",
                 "functools", "heapq", "itertools", "json", "logging", "pathlib", "re", "statistics",
                 "string", "subprocess", "textwrap", "typing", "unittest", "urllib.parse", "zipfile"]
        topics = {n: importlib.import_module(n).__doc__ or "" for n in names}
    return sorted((k, v.strip()) for k, v in topics.items() if v and v.strip())


def builtin_text(part: str = "calibration") -> str:
    """The calibration part (4/5 of the topics) or the evaluation part (the other 1/5)."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part {part!r} is not 'calibration' or 'evaluation'")
    keep = (lambda i: i % 5 != 4) if part == "calibration" else (lambda i: i % 5 == 4)
    return "\n\n".join(text for i, (_, text) in enumerate(_topics()) if keep(i))


def builtin_sentences(part: str = "calibration", *, min_words: int = 6) -> list[str]:
    """Paragraph-sized snippets of :func:`builtin_text` for encoder calibration."""
    out = []
    for para in builtin_text(part).split("\n\n"):
        para = " ".join(para.split())
        if len(para.split()) >= min_words:
            out.append(para)
    return out
