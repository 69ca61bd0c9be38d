"""Save and reload pruned (and quantized) models as Hugging Face directories.

A pruned checkpoint is a normal Hugging Face directory (``config.json`` +
``model.safetensors``, tokenizer files when given) plus ``tshrink.json``, which records the
per-layer widths (layers may differ, and stock config classes cannot express that) and any
transform stages whose compact form lies in ``compressed.safetensors``. :func:`load_pruned`
rebuilds the non-uniform shapes and reads the weights in one call. Only safetensors are
read or written: never pickles. Writes go to a temporary sibling directory that is renamed
into place, so an interrupted save leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .arch.families import get_adapter

MANIFEST = "tshrink.json"
COMPRESSED = "compressed.safetensors"
FORMAT = "tshrink-pruned/1"


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pruned(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None,
                info: dict[str, Any] | None = None,
                compressed: dict[str, dict[str, Any]] | None = None) -> Path:
    """Save ``model`` (pruned or not) to directory ``path``; replaces an existing one.

    compressed: per transform stage, ``{"tensors": {...}, "meta": {...}}`` — the compact form
        written by a transform stage (see :class:`tshrink.units.TransformResult`).
    """
    path = Path(path)
    try:
        adapter = get_adapter(model)
        widths, family = adapter.widths(), adapter.family
        from .surgery import output_bias_flags

        biases = output_bias_flags(adapter)  # corrections may add biases the config has no slot for
    except ValueError:  # not prunable here (e.g. a quantized encoder-decoder): full shapes
        widths, family, biases = None, None, None
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "tshrink_version": __version__,
            "architecture": type(model).__name__,
            "family": family,
            "widths": widths,
            "output_biases": biases,
            "transforms": [],
            **(info or {}),
        }
        if compressed:
            from safetensors.torch import save_file

            flat = {}
            for stage, part in compressed.items():
                flat.update({f"{stage}/{k}": v.detach().contiguous().cpu() for k, v in part["tensors"].items()})
                manifest["transforms"].append({"stage": stage, "meta": part.get("meta", {})})
            save_file(flat, str(tmp / COMPRESSED))
        write_json_atomic(tmp / MANIFEST, manifest)
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.exists() else None


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors (only safetensors checkpoints are read)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def load_pruned(path: str | os.PathLike, *, pm: Any = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_pruned` (or a plain Hugging Face directory).

    Builds the architecture from ``config.json``, gives every layer its recorded width,
    reads the safetensors weights, ties embeddings where the config says so, and restores the
    compact forms of transform stages through their plugins' ``tshrink_restore`` hooks.
    """
    import transformers
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
    manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    if manifest is None:
        arch = (config.architectures or ["AutoModel"])[0]
        return getattr(transformers, arch).from_pretrained(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    cls = getattr(transformers, manifest["architecture"])
    if manifest["widths"] is None:
        # Full shapes (an architecture without adapter, e.g. a quantized Marian): Hugging Face's
        # loader knows its tied and non-persistent weights (shared embeddings, sinusoidal positions).
        model = cls.from_pretrained(path)
    else:
        from transformers.initialization import no_init_weights

        from .surgery import restore_output_biases, shrink_to_widths

        with no_init_weights():
            model = cls(config)
        shrink_to_widths(get_adapter(model), manifest["widths"])
        restore_output_biases(get_adapter(model), manifest.get("output_biases"))
        state = _state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
        if set(missing) - tied or unexpected:
            raise ValueError(f"{path}: checkpoint does not match its manifest "
                             f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if manifest["transforms"]:
        from safetensors.torch import load_file

        from .manager import get_plugin_manager

        flat = load_file(str(path / COMPRESSED))
        pm = pm or get_plugin_manager()
        for entry in manifest["transforms"]:
            stage = entry["stage"]
            tensors = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(stage + "/")}
            if not pm.hook.tshrink_restore(name=stage, model=model, tensors=tensors, meta=entry["meta"]):
                raise ValueError(f"{path}: no installed plugin restores transform stage {stage!r}")
    model.eval()
    return model
