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
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .arch.families import get_adapter
from .outputs import atomic_dir, write_json_atomic  # noqa: F401  (re-exported: the one atomic writer)

MANIFEST = "tshrink.json"
COMPRESSED = "compressed.safetensors"
FORMAT = "tshrink-pruned/1"


def save_pruned(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None,
                info: dict[str, Any] | None = None,
                compressed: dict[str, dict[str, Any]] | None = None,
                files: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save ``model`` (pruned or not) to directory ``path``, atomically.

    ``path`` must be new, empty, or (with ``overwrite=True``) a checkpoint this function wrote
    (it holds ``tshrink.json``); anything else raises :class:`tshrink.outputs.OutputError`
    before anything is written (see :mod:`tshrink.outputs`).

    compressed: per transform stage, ``{"tensors": {...}, "meta": {...}}`` — the compact form
        written by a transform stage (see :class:`tshrink.units.TransformResult`).
    files: extra JSON files written inside the checkpoint (e.g. ``{"report.json": report}``).
    """
    path = Path(path)
    try:
        adapter = get_adapter(model)
        widths, family = adapter.widths(), adapter.family
        from .surgery import output_bias_flags

        biases = output_bias_flags(adapter)  # corrections may add biases the config has no slot for
    except ValueError:  # not prunable here (e.g. a quantized encoder-decoder): full shapes
        widths, family, biases = None, None, None
    with atomic_dir(path, markers=(MANIFEST,), overwrite=overwrite) as tmp:
        # mixture-of-experts: the fused (experts, neurons, hidden) tensors as the modules hold them;
        # transformers' "original format" splits them per expert, which load_pruned does not read
        fused = {"save_original_format": False} if family == "moe" else {}
        model.save_pretrained(tmp, safe_serialization=True, **fused)
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
        for name, data in (files or {}).items():
            write_json_atomic(tmp / name, data)
        write_json_atomic(tmp / MANIFEST, manifest)  # last: its presence marks a complete checkpoint
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed ``tshrink.json`` of ``path`` (None when absent); ValueError when unreadable."""
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); the checkpoint's manifest is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def allowed_architectures(model_type: str | None) -> set[str]:
    """Model classes a checkpoint of ``model_type`` may name: those of transformers' auto
    mappings for that type (an allow-list, never any attribute of ``transformers``)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if attr.startswith("MODEL") and attr.endswith("_MAPPING_NAMES"):
            value = getattr(modeling_auto, attr).get(model_type)
            names.update([value] if isinstance(value, str) else list(value or ()))
    return names


def _model_class(name: Any, config: Any, where: str) -> Any:
    import transformers

    allowed = allowed_architectures(getattr(config, "model_type", None))
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{where}: architecture {name!r} is not a model class for model type "
                         f"{getattr(config, 'model_type', None)!r}; expected one of {', '.join(sorted(allowed)) or '(none)'}")
    return getattr(transformers, name)


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """ValueError naming the first field of ``tshrink.json`` that is missing or malformed."""
    file = path / MANIFEST
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    for key in ("architecture", "widths", "transforms"):
        if key not in manifest:
            raise ValueError(f"{file}: field {key!r} is missing")
    widths = manifest["widths"]
    if widths is not None:
        if not isinstance(widths, dict) or not {"heads", "neurons"} <= set(widths) <= {"heads", "neurons", "group"}:
            raise ValueError(f"{file}: 'widths' must be null or {{\"heads\": [...], \"neurons\": [...]}} (and "
                             f"optionally \"group\": [...]), got {widths!r:.80}")
        for kind in [k for k in ("heads", "neurons", "group") if k in widths]:
            values = widths[kind]
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                       for v in values):
                raise ValueError(f"{file}: 'widths.{kind}' must be a list of non-negative integers, got {values!r:.80}")
        for kind in [k for k in ("neurons", "group") if k in widths]:
            if len(widths["heads"]) != len(widths[kind]):
                raise ValueError(f"{file}: 'widths' has {len(widths['heads'])} head counts but "
                                 f"{len(widths[kind])} {kind} counts (one per layer each)")
    transforms = manifest["transforms"]
    if not isinstance(transforms, list) or not all(isinstance(t, dict) and isinstance(t.get("stage"), str)
                                                   for t in transforms):
        raise ValueError(f"{file}: 'transforms' must be a list of {{\"stage\": NAME, \"meta\": {{...}}}}")


def _check_widths(adapter: Any, widths: dict[str, list[int]], file: Path) -> None:
    heads, neurons = adapter.head_counts(), adapter.neuron_counts()
    if len(widths["heads"]) != len(heads):
        raise ValueError(f"{file}: 'widths' lists {len(widths['heads'])} layers, config.json has {len(heads)}")
    for i, (h, n, h0, n0) in enumerate(zip(widths["heads"], widths["neurons"], heads, neurons)):
        if h > h0 or n > n0:
            raise ValueError(f"{file}: 'widths' layer {i} keeps {h} attention units and {n} neurons, more than "
                             f"config.json's {h0} and {n0}")


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type (and OSError)
        raise ValueError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err}); "
                         f"the file is damaged or truncated") from None


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err!r})") from None
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors (only safetensors checkpoints are read)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(_load_file(path / name))
    return state


def _shape_mismatches(model: nn.Module, state: dict[str, torch.Tensor], widths: dict[str, list[int]],
                      file: Path) -> None:
    """ValueError naming the tensor whose shape disagrees with the manifest's widths."""
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            m = re.search(r"\.(\d+)\.", key)
            layer = f"layer {m[1]}: {widths['heads'][int(m[1])]} attention units, {widths['neurons'][int(m[1])]} neurons" \
                if m and int(m[1]) < len(widths["heads"]) else "widths"
            raise ValueError(f"{file}: 'widths' ({layer}) disagrees with tensor {key!r}: saved shape "
                             f"{tuple(tensor.shape)}, the widths give {tuple(own[key].shape)}")


def _config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path / 'config.json'}: cannot be read as a model config ({err})") from None


def load_pruned(path: str | os.PathLike, *, pm: Any = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_pruned` (or a plain Hugging Face directory).

    Builds the architecture from ``config.json``, gives every layer its recorded width,
    reads the safetensors weights, ties embeddings where the config says so, and restores the
    compact forms of transform stages through their plugins' ``tshrink_restore`` hooks.
    A manifest that is damaged, names a class that is not a model class of the config's type,
    or disagrees with the weights raises ValueError naming the field and the tensor.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
    manifest = read_manifest(path)
    config = _config(path)
    if manifest is None:
        arch = (config.architectures or ["AutoModel"])[0]
        if arch == "AutoModel":
            from transformers import AutoModel

            return AutoModel.from_pretrained(path)
        return _model_class(arch, config, str(path / "config.json")).from_pretrained(path)
    _check_manifest(manifest, path)
    file = path / MANIFEST
    cls = _model_class(manifest["architecture"], config, str(file))
    if manifest["widths"] is None:
        # Full shapes (an architecture without adapter, e.g. a quantized Marian): Hugging Face's
        # loader knows its tied and non-persistent weights (shared embeddings, sinusoidal positions).
        model = cls.from_pretrained(path)
    else:
        from transformers.initialization import no_init_weights

        from .arch.keys import rename_checkpoint_keys
        from .placement import checkpoint_dtype
        from .surgery import restore_output_biases, shrink_to_widths

        with no_init_weights():
            model = cls(config)
        if checkpoint_dtype(config) is not None:  # reload in the dtype it was saved in (bfloat16 stays bfloat16)
            model.to(checkpoint_dtype(config))
        adapter = get_adapter(model)
        _check_widths(adapter, manifest["widths"], file)
        shrink_to_widths(adapter, manifest["widths"])
        restore_output_biases(adapter, manifest.get("output_biases"))
        state = rename_checkpoint_keys(model, _state_dict(path))
        _shape_mismatches(model, state, manifest["widths"], file)
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
        if set(missing) - tied or unexpected:
            raise ValueError(f"{path}: checkpoint does not match its manifest "
                             f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if manifest["transforms"]:
        from .manager import get_plugin_manager

        from .registry import Registry

        flat = _load_file(path / COMPRESSED)
        registry = Registry(pm or get_plugin_manager())
        for entry in manifest["transforms"]:
            stage = entry["stage"]
            tensors = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(stage + "/")}
            if ("transform", stage) not in registry.stages:
                raise ValueError(f"{path}: no loaded plugin declares transform stage {stage!r}, whose compact "
                                 "form this checkpoint holds (install or unblock the plugin that wrote it)")
            restore = registry.stage_hook("transform", stage, hook="tshrink_restore")  # its owner only
            if not restore(name=stage, model=model, tensors=tensors, meta=entry.get("meta", {})):
                raise ValueError(f"{path}: plugin {registry.stage_sources[('transform', stage)]} declares transform "
                                 f"stage {stage!r} but its tshrink_restore did not restore it")
    model.eval()
    return model
