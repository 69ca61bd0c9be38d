"""Evaluating a model larger than one device through accelerate's ``device_map`` dispatch.

``harness compare --eval-device-map auto [--eval-max-memory 0=20GiB,1=20GiB,cpu=60GiB]``: for
the evaluation step (perplexity, lm-eval) the pruned (and dense) model is spread by
``accelerate.infer_auto_device_map`` over the GPUs, the CPU and, past ``cpu``'s share, the disk
(``accelerate.dispatch_model`` with an offload folder the harness owns, deleted afterwards);
accelerate's hooks move each block's weights and inputs where it runs. Afterwards the hooks are
removed, which puts every weight back where it was, so the run's other measurements see the
model unchanged. The host still holds the loaded weights (the model is loaded there): the map
bounds what sits on each device, not host memory.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MAP_CHOICES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | None) -> dict[Any, int] | None:
    """'0=20GiB,cpu=60GiB' -> {0: bytes, "cpu": bytes}; ValueError naming the value otherwise."""
    from tshrink.placement import PlacementError, parse_bytes

    if not text:
        return None
    out: dict[Any, int] = {}
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        name = name.strip().lower()
        try:
            if not sep or not (name.isdigit() or name in ("cpu", "disk")):
                raise PlacementError("")
            out[int(name) if name.isdigit() else name] = int(parse_bytes(size.strip()))
        except PlacementError:
            raise ValueError(f"--eval-max-memory {text!r}: each entry is DEVICE=SIZE with DEVICE a GPU index, cpu or "
                             f"disk and SIZE like 20GiB (e.g. 0=20GiB,cpu=60GiB)") from None
    return out


def check_device_map(value: str | None) -> str | None:
    if value is None or value.lower() == "none":
        return None
    if value not in MAP_CHOICES:
        raise ValueError(f"--eval-device-map {value!r} is not one of none, {', '.join(MAP_CHOICES)}")
    return value


@contextmanager
def dispatched(model: Any, device_map: str = "auto", max_memory: dict[Any, int] | None = None) -> Iterator[dict[str, Any]]:
    """``model`` dispatched by accelerate for the duration of the block; yields the map's
    description (``device_map``: module -> device, ``input_device``: where inputs go)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_submodules
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if dmap.get("") == "disk":
        raise ValueError(f"--eval-max-memory {max_memory}: no device or cpu share holds even the largest block of the "
                         f"model (accelerate keeps room for it on the first device); give the devices or cpu more")
    offload = tempfile.mkdtemp(prefix="tshrink-eval-offload-")
    placed = {str(k): (v if isinstance(v, str) else f"cuda:{v}" if isinstance(v, int) else str(v))
              for k, v in dmap.items()}
    first = next(iter(placed.values()))
    try:
        main = "cpu" if first in ("cpu", "disk") else first
        dispatch_model(model, device_map=dmap, offload_dir=offload, main_device=main if main != "cpu" else None)
        yield {"device_map": placed, "input_device": main, "max_memory": {str(k): v for k, v in (max_memory or {}).items()},
               "engine": "accelerate.dispatch_model", "disk_modules": sorted(k for k, v in placed.items() if v == "disk")}
    finally:
        remove_hook_from_submodules(model)
        for attr in ("hf_device_map",):
            if hasattr(model, attr):
                try:
                    delattr(model, attr)
                except AttributeError:
                    pass
        shutil.rmtree(offload, ignore_errors=True)
