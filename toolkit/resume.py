"""Resuming a long prune after a kill: per-layer state of the layer-wise stages, written atomically.

A prune given a resume directory (``prune(..., resume=DIR)``; ``harness prune`` uses the hidden
sibling ``.OUTPUT.tshrink-resume`` of its ``--output``) keeps there, per stage and layer, what
the stage needs to skip that layer on a rerun (STAT: the layer's error curves when scoring; the
kept units and the folded columns when correcting). Each file is written to a temporary name and
renamed (:func:`tshrink.outputs.write_bytes_atomic`), so a kill leaves whole files only. The
directory is the toolkit's own: its marker ``tshrink-resume.json`` names the run (model
fingerprint, method, options, budget, seed, calibration); a rerun of another run clears only the
files this module wrote, and a finished prune removes the directory.

Layout (nanoGPT-short)::

    DIR/tshrink-resume.json                     {"key": ..., "what": ...}
    DIR/<stage>/layer-00003.safetensors         tensors + {"key": stage key, "meta": json}
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

MARKER = "tshrink-resume.json"
_LAYER = re.compile(r"^layer-\d{5}\.safetensors$")


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights (names, shapes, dtypes and a few values of every
    tensor): reading every byte of a 70B model would take minutes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() and flat.device.type != "meta":
            pick = torch.cat([flat[:16], flat[-16:], flat[:: max(1, flat.numel() // 16)][:16]])
            h.update(pick.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def key_of(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageState:
    """One stage's per-layer state. ``key``: what the stage's result depends on besides the run
    (e.g. the incoming selection); a file written under another key is ignored."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self.restored: list[int] = []

    def _file(self, layer: int) -> Path:
        return self.folder / f"layer-{layer:05d}.safetensors"

    def load(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, meta) saved for ``layer`` under this key, else None."""
        from safetensors import safe_open

        path = self._file(layer)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                info = f.metadata() or {}
                if info.get("key") != self.key:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - an unreadable file is recomputed, never trusted
            return None
        self.restored.append(layer)
        return tensors, json.loads(info.get("meta", "{}"))

    def save(self, layer: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from safetensors.torch import save

        from .outputs import write_bytes_atomic

        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        write_bytes_atomic(self._file(layer), save(data, metadata={"key": self.key, "meta": json.dumps(meta)}))


class ResumeDir:
    """The resume directory of one prune run (see the module docstring)."""

    def __init__(self, root: str | Path, key: str, what: dict[str, Any] | None = None) -> None:
        from .outputs import write_json_atomic

        self.root = Path(root)
        self.key = key
        marker = self.root / MARKER
        if self.root.exists() and not marker.is_file() and any(self.root.iterdir()):
            raise ValueError(f"resume directory {str(self.root)!r} exists and was not written by tshrink (no {MARKER}); "
                             f"move it away or give another one")
        if marker.is_file():
            try:
                old = json.loads(marker.read_text()).get("key")
            except (OSError, ValueError):
                old = None
            if old != key:  # another run's state: drop the files this module wrote
                self._clear_files()
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"key": key, "what": what or {}})

    def stage(self, name: str, key: Any = None) -> StageState:
        folder = self.root / re.sub(r"[^A-Za-z0-9._-]+", "-", name)
        return StageState(folder, key_of([self.key, name, key]))

    def _clear_files(self) -> None:
        from .outputs import _OWN

        for sub in self.root.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if _LAYER.match(f.name) or _OWN.match(f.name):  # also a write a kill interrupted
                        f.unlink(missing_ok=True)
                if not any(sub.iterdir()):
                    sub.rmdir()

    def remove(self) -> None:
        """Delete the directory after a finished run (only when it holds nothing but our files)."""
        if not self.root.is_dir():
            return
        self._clear_files()
        (self.root / MARKER).unlink(missing_ok=True)
        if not any(self.root.iterdir()):
            self.root.rmdir()
