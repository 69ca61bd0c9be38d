"""The one place that decides where benchmark data lives.

``--data-dir`` wins, then ``$TSHRINK_DATA_DIR``; otherwise there is no local data directory
(tasks then say which files they need, or read the Hugging Face hub where they can). There
is deliberately no guessed default: the test suite finds ``<repo>/../shared/data`` through
its own ``data_dir`` fixture, never through this module.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "TSHRINK_DATA_DIR"


def resolve_data_dir(given: str | os.PathLike | None = None, *, required: bool = False,
                     what: str = "this task") -> Path | None:
    """The local data directory (``given``, else ``$TSHRINK_DATA_DIR``), or None.

    Raises FileNotFoundError when the chosen directory does not exist, or when none is set
    and ``required`` (``what`` names who needs it in the message).
    """
    value = os.fspath(given) if given is not None else os.environ.get(ENV)
    if not value:
        if required:
            raise FileNotFoundError(f"{what} needs local data: pass --data-dir DIR or set {ENV}=DIR")
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "--data-dir" if given is not None else f"${ENV}"
        raise FileNotFoundError(f"data directory {value!r} (from {source}) does not exist")
    return path


def require_files(data_dir: Path, files: dict[str, list[str]], *, what: str, layout: str) -> dict[str, Path]:
    """For each role (e.g. 'evaluation'), the first of its candidate relative paths that
    exists under ``data_dir``; FileNotFoundError naming every path tried and the layout."""
    found: dict[str, Path] = {}
    for role, candidates in files.items():
        for rel in candidates:
            if (data_dir / rel).is_file():
                found[role] = data_dir / rel
                break
        else:
            tried = ", ".join(str(data_dir / rel) for rel in candidates)
            raise FileNotFoundError(f"{what}: no {role} file in {data_dir}; looked for {tried}. "
                                    f"Expected layout: {layout}")
    return found
