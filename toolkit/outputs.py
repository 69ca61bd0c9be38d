"""Writing outputs without ever losing a user's files.

Rules (README, "What the toolkit writes and when it refuses"):

- The toolkit replaces a directory only if it wrote it itself: the directory holds one of the
  manifests the writer names (``tshrink.json`` for a pruned checkpoint, ``finetune.json`` for a
  fine-tune), or it is empty. Replacing a checkpoint also needs ``overwrite=True``
  (``--overwrite``). Anything else -- a directory of the user's, a file, the working directory or
  one of its parents, the home directory, the root -- is refused, ``overwrite`` or not.
- Checks run before any work (:func:`check_output_dir`), and again just before the swap.
- Outputs are staged in a hidden sibling (``.NAME.tshrink-stage-PID-XXXX``) and swapped in
  atomically: the old directory is renamed aside (``.NAME.tshrink-old-PID-XXXX``), the new one
  renamed in, then the old one deleted. A kill at any point leaves either the old or the new
  directory under NAME; the next write to NAME deletes stale stage directories of dead
  processes and puts a stranded old directory back if NAME is missing.
- Files and directories get the usual permissions (``0o666`` / ``0o777`` less the umask).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGE = "tshrink-stage"
OLD = "tshrink-old"
_OWN = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{STAGE}|{OLD})-(?P<pid>\d+)-[0-9a-f]{{8}}$")


class OutputError(ValueError):
    """An output path the toolkit will not write to; the message says why and what to do."""


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stage_name(path: Path, tag: str = STAGE) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a staged sibling and an atomic rename (mode 0o666 - umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _stage_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON (sorted keys, indented, trailing newline) to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _protected(resolved: Path) -> str | None:
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "the file-system root"
    if resolved == Path.home().resolve():
        return "your home directory"
    if resolved == cwd:
        return "the working directory"
    if cwd.is_relative_to(resolved):
        return "a parent of the working directory"
    return None


def _owned(path: Path, markers: tuple[str, ...]) -> str | None:
    """The manifest that marks ``path`` as the toolkit's, or None."""
    return next((m for m in markers if (path / m).is_file()), None)


def check_output_dir(path: str | os.PathLike, *, markers: tuple[str, ...], overwrite: bool = False,
                     what: str = "output", flag: str | None = None) -> Path:
    """Check that a directory may be (re)written at ``path``; return it. Raises :class:`OutputError`.

    markers: manifest file names that mark a directory this writer may replace.
    overwrite: allow replacing such a directory (an empty directory is always fine).
    what: how the message names the path (e.g. ``--output``).
    flag: how the message names the overwrite switch (default ``--overwrite`` for a command-line
        option, else ``overwrite=True``).
    """
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{what} is empty: give a directory for the new checkpoint, e.g. {what} pruned/")
    path = Path(text).expanduser()
    resolved = path.resolve()
    reason = _protected(resolved)
    if reason:
        raise OutputError(f"{what} {text!r} is {reason} ({resolved}), which the toolkit never replaces: "
                          f"give a new directory, e.g. {what} {Path(text) / 'pruned'}")
    if path.is_symlink():
        raise OutputError(f"{what} {text!r} is a symbolic link (to {os.readlink(path)}); give a real directory path")
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{what} {text!r} is a file, not a directory; give a directory path")
        if any(path.iterdir()):
            owner = _owned(path, markers)
            if owner is None:
                raise OutputError(
                    f"{what} {text!r} is a non-empty directory the toolkit did not write (no "
                    f"{' or '.join(markers)} in it); it never replaces such a directory: give a new or empty one")
            if not overwrite:
                flag = flag or ("--overwrite" if what.startswith("--") else "overwrite=True")
                raise OutputError(f"{what} {text!r} already holds a checkpoint written by the toolkit ({owner}); "
                                  f"pass {flag} to replace it, or give another directory")
        if not os.access(path, os.W_OK | os.X_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {text!r}: permission denied (cannot replace {resolved})")
        return path
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what} {text!r}: {ancestor} is a file, so no directory can be created under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {text!r}: permission denied (cannot create directories in {ancestor.resolve()})")
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the stage directories of dead processes for ``path``; restore a stranded old one.

    Only names of this module's own pattern (``.NAME.tshrink-stage-PID-XXXXXXXX``) are touched.
    Returns what was removed or restored."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    done = []
    for entry in sorted(path.parent.iterdir()):
        m = _OWN.match(entry.name)
        if not m or m["name"] != path.name or _alive(int(m["pid"])):
            continue
        if m["tag"] == OLD and not path.exists() and not path.is_symlink():
            os.rename(entry, path)  # a swap was interrupted between its two renames: put the old one back
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        done.append(entry)
    return done


@contextmanager
def atomic_dir(path: str | os.PathLike, *, markers: tuple[str, ...], overwrite: bool = False,
               what: str = "output", flag: str | None = None) -> Iterator[Path]:
    """Yield a staged directory that replaces ``path`` atomically if the block succeeds.

    ``path`` is checked first (:func:`check_output_dir`) and again before the swap; if it changed
    in between so that it may no longer be replaced, the staged output is kept and named."""
    path = Path(os.fspath(path)).expanduser()
    check_output_dir(path, markers=markers, overwrite=overwrite, what=what, flag=flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _stage_name(path)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        try:
            check_output_dir(path, markers=markers, overwrite=overwrite, what=what, flag=flag)
        except OutputError as err:
            kept = path.parent / f"{path.name}.new-{secrets.token_hex(4)}"
            os.rename(tmp, kept)
            raise OutputError(f"{err} (it changed while the toolkit worked; the new output is kept at {kept})") from None
        old = None
        if path.exists():
            old = _stage_name(path, OLD)
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
