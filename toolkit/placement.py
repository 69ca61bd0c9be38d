"""Where a prune runs: device and dtype choice, and layer-wise offload for big decoders.

``--device cpu|cuda|cuda:N|auto`` and ``--dtype auto|bfloat16|float16|float32`` are checked
by :func:`resolve_device` / :func:`resolve_dtype` before any weights are loaded (one line
naming the value and what is accepted). :func:`plan_placement` then decides, from the
model's config (parameter counts from a meta-device build: no weights are read) and the
memory available:

* ``layers="device"``: the whole model fits on the compute device with room for one layer's
  statistics and activations -- the model is moved there;
* ``layers="offload"``: only the modules outside the transformer layers (embeddings, final
  norm, head) go to the device; the layers stay on the host and the calibration stream
  (:class:`tshrink.calibration.LayerStream`) moves each one to the device for its own passes.
  Peak device memory ~= the non-layer modules + one layer + its statistics + one batch of
  activations, so a model larger than the device still prunes;
* otherwise a :class:`PlacementError` saying how much is needed and how much there is.

The calibration hidden states (tokens x hidden, in the model's dtype) stay on the device
when they fit next to the rest, else on the host; the plan says which and why
(:meth:`Placement.describe` goes into the prune report).

Memory available: ``torch.cuda.mem_get_info`` on a GPU, the host's available memory on the
CPU, or a forced limit (``--device-memory 2GiB`` / ``TSHRINK_DEVICE_MEMORY``): the tests use it
to force offload on the CPU.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = "cpu, cuda, cuda:N, auto"
MEMORY_ENV = "TSHRINK_DEVICE_MEMORY"
_GIB = 1024 ** 3


class PlacementError(ValueError):
    """The model cannot be placed (device absent, dtype unsupported, memory too small)."""


# -- device and dtype ------------------------------------------------------------------------
def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` (= the current CUDA device), ``cuda:N`` or ``auto`` (CUDA when present)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "cpu").strip().lower()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if n else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise PlacementError(f"--device {spec!r} is not one of {DEVICE_CHOICES}")
    if n == 0:
        raise PlacementError(f"--device {spec}: torch sees no CUDA device (CPU build or no GPU); use --device cpu")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    if index >= n:
        have = ", ".join(f"cuda:{i}" for i in range(n))
        raise PlacementError(f"--device {spec}: this machine has {n} CUDA device(s) ({have}); use one of them")
    return torch.device("cuda", index)


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype a checkpoint's config declares (``dtype`` / ``torch_dtype``), if any."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value.replace("torch.", ""))
    return value if isinstance(value, torch.dtype) else None


def resolve_dtype(spec: str | None, device: torch.device, config: Any = None) -> tuple[torch.dtype, str]:
    """(dtype to load and run in, how it was chosen). ``auto`` = the checkpoint's dtype
    (float32 when it declares none, or when it is float16 and the device is the CPU)."""
    text = (spec or "auto").strip().lower()
    if text not in DTYPE_CHOICES:
        raise PlacementError(f"--dtype {spec!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if text == "auto":
        found = checkpoint_dtype(config) if config is not None else None
        if found is None:
            return torch.float32, "auto: the checkpoint declares no dtype -> float32"
        if found == torch.float16 and device.type == "cpu":
            return torch.float32, "auto: float16 checkpoint on the CPU (no fast float16 kernels) -> float32"
        if found not in DTYPES.values():
            return torch.float32, f"auto: checkpoint dtype {found} -> float32"
        return found, f"auto: the checkpoint's {str(found).replace('torch.', '')}"
    dtype = DTYPES[text]
    if dtype == torch.float16 and device.type == "cpu":
        raise PlacementError("--dtype float16 on the CPU: torch has no fast float16 CPU kernels and the "
                             "statistics lose precision; use --dtype bfloat16 or float32 (or a CUDA --device)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PlacementError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; "
                             "use --dtype float16 or float32")
    return dtype, "given"


# -- memory ---------------------------------------------------------------------------------
def parse_bytes(text: str | int | None) -> int | None:
    """``"2GiB"``, ``"512MB"``, ``"1e9"`` or an int -> bytes (None stays None)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(text))
    if m is None:
        raise PlacementError(f"memory size {text!r}: give a number of bytes or e.g. 512MiB, 24GiB")
    unit = (m.group(2) or "b").lower().rstrip("b").rstrip("i")
    scale = {"": 1, "k": 1024, "m": 1024 ** 2, "g": _GIB, "t": 1024 ** 4}[unit]
    try:
        return int(float(m.group(1)) * scale)
    except ValueError:
        raise PlacementError(f"memory size {text!r}: give a number of bytes or e.g. 512MiB, 24GiB") from None


def host_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a benchmark extra: fall back on sysconf
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_available(device: torch.device, limit: int | None = None) -> tuple[int, str]:
    """(bytes usable on ``device``, where the figure comes from)."""
    forced = limit if limit is not None else parse_bytes(os.environ.get(MEMORY_ENV))
    if forced is not None:
        return forced, "forced limit"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "cuda free memory"
    return host_available(), "host available memory"


# -- the plan --------------------------------------------------------------------------------
@dataclass
class Shape:
    """Byte counts of a model in its run dtype, from its config (no weights read)."""

    layer_bytes: int  # the largest transformer layer
    other_bytes: int  # everything outside the layers (embeddings, norm, head; tied weights once)
    n_layers: int
    hidden: int
    intermediate: int
    dtype_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + self.n_layers * self.layer_bytes


def model_shape(model_or_config: Any, dtype: torch.dtype, head: str = "base") -> Shape:
    """Byte counts of ``model_or_config`` (a model, or a config built on the meta device)."""
    from .arch.families import get_adapter

    model = model_or_config
    if not isinstance(model, nn.Module):
        from .models import _auto_class

        cls = _auto_class(head, model_or_config)  # an Auto class, or the checkpoint's own class ("base")
        with torch.device("meta"):
            model = cls.from_config(model_or_config) if hasattr(cls, "from_config") else cls(model_or_config)
    adapter = get_adapter(model)
    size = torch.empty((), dtype=dtype).element_size()
    layers = adapter.layers()
    in_layers = {id(p) for p in layers.parameters()}
    other = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_layers)
    per_layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    return Shape(per_layer * size, other * size, len(layers), adapter.hidden_size,
                 max(adapter.neuron_counts() or [0]), size)


STATS_COPIES = 6  # n x n float64 matrices alive at once in STAT's decomposition (measured 5.8 at 7B shape)


def stats_bytes(shape: Shape) -> int:
    """Working memory of one layer's statistics, the largest of the built-in methods: STAT's
    float64 Grams of the down- and output-projection inputs with the copies its decomposition
    holds at its peak (Gram, scaled copy, symmetrised copy, LAPACK workspace, fold rows):
    ``STATS_COPIES x 8 (n^2 + h^2)`` bytes, from benchmarks/scale_bench.py's 7B-shaped layer."""
    return STATS_COPIES * 8 * (shape.intermediate ** 2 + shape.hidden ** 2)


def activation_bytes(shape: Shape, batch_tokens: int) -> int:
    """One batch through one layer: the input, the MLP's up/gate/product (intermediate wide,
    float32 where statistics upcast) and the output."""
    return batch_tokens * (4 * shape.hidden * shape.dtype_bytes + 3 * shape.intermediate * 4)


@dataclass
class Placement:
    device: torch.device
    dtype: torch.dtype
    layers: str  # "device" or "offload"
    hidden: str  # "device" or "host": where the calibration hidden states live
    available_bytes: int
    available_source: str
    need_resident_bytes: int
    need_offload_bytes: int
    hidden_bytes: int
    reason: str

    @property
    def layer_offload(self) -> bool:
        return self.layers == "offload"

    @property
    def hidden_device(self) -> torch.device:
        return self.device if self.hidden == "device" else torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["device"], d["dtype"] = str(self.device), str(self.dtype).replace("torch.", "")
        for k in ("available_bytes", "need_resident_bytes", "need_offload_bytes", "hidden_bytes"):
            d[k.replace("_bytes", "_gib")] = round(d.pop(k) / _GIB, 3)
        return d


def _gib(n: int) -> str:
    """Human-readable bytes: 1.50 GiB, 12.0 MiB, 96 KiB."""
    for unit, scale in (("GiB", _GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def plan_placement(shape: Shape, device: torch.device, dtype: torch.dtype, *, calib_tokens: int,
                   batch_tokens: int, copies: int = 2, limit: int | None = None,
                   offload: str = "auto") -> Placement:
    """Layers on the device or offloaded, hidden states on the device or the host.

    ``calib_tokens``: all calibration tokens (padding included); ``batch_tokens``: the largest
    batch; ``copies``: hidden-state sets a method keeps (2: the stream's inputs and the next
    layer's, or teacher + student). ``offload``: ``auto`` (from memory), ``always``, ``never``.
    Raises :class:`PlacementError` when even offload cannot fit.
    """
    if offload not in ("auto", "always", "never"):
        raise PlacementError(f"offload {offload!r} is not one of auto, always, never")
    avail, source = device_available(device, limit)
    work = stats_bytes(shape) + activation_bytes(shape, batch_tokens)
    hidden = copies * calib_tokens * shape.hidden * shape.dtype_bytes
    resident = shape.total_bytes + work
    offloaded = shape.other_bytes + shape.layer_bytes + work
    if offload == "never" or (offload == "auto" and resident <= avail):
        if offload == "never" and resident > avail:
            raise PlacementError(f"the model needs ~{_gib(resident)} on {device} without offload, "
                                 f"{_gib(avail)} available ({source}); allow layer offload")
        layers, need = "device", resident
        reason = f"the whole model fits ({_gib(resident)} of {_gib(avail)}, {source})"
    elif offloaded <= avail:
        layers, need = "offload", offloaded
        reason = (f"the model needs {_gib(resident)} on {device}, {_gib(avail)} available ({source}): layers stay "
                  f"on the host, one at a time on the device ({_gib(offloaded)})")
    else:
        raise PlacementError(
            f"even with layer offload the prune needs ~{_gib(offloaded)} on {device} (modules outside the "
            f"layers {_gib(shape.other_bytes)} + one layer {_gib(shape.layer_bytes)} + its statistics and one "
            f"batch {_gib(work)}); {_gib(avail)} available ({source}). Use a larger device, a smaller "
            "calibration batch (--batch-size), or --dtype bfloat16")
    if device.type == "cpu" or need + hidden <= avail:
        where = "device"
        reason += f"; hidden states ({_gib(hidden)}) on the device"
    else:
        where = "host"
        reason += f"; hidden states ({_gib(hidden)}) on the host: they do not fit next to the rest"
    host_need = (shape.layer_bytes if layers == "offload" else 0) + (hidden if where == "host" else 0)
    if device.type != "cpu" and host_need > host_available():
        raise PlacementError(f"the host has {_gib(host_available())} available, less than one layer plus the hidden "
                             f"states ({_gib(host_need)}); use fewer calibration tokens")
    return Placement(device, dtype, layers, where, avail, source, resident, offloaded, hidden, reason)


def place_model(model: nn.Module, adapter: Any, placement: Placement) -> None:
    """Move ``model`` as planned: all of it to the device, or all but its layers (which
    :class:`~tshrink.calibration.LayerStream` moves one at a time)."""
    if not placement.layer_offload:
        model.to(placement.device)
        return
    layers = adapter.layers()
    held = dict(layers._modules)
    layers._modules.clear()
    try:
        model.to(placement.device)
    finally:
        layers._modules.update(held)
    layers.to("cpu")
