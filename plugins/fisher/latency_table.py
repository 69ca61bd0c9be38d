"""Latency look-up tables measured on the run's device, cached per device.

As in the paper (and the public code's ``generate_lut.py``), one sub-layer is timed at
every width: attention with ``1..H`` heads (KV groups), the MLP with ``n`` neurons.
Here the model's OWN first transformer block is timed (a copy, pruned by the toolkit's
surgery, called with the keyword arguments the backbone passes its layers), so every
supported family works without a hand-written replica:

    base     = T(block with no head and no neuron)            # norms, residuals, overhead
    heads[k] = T(block with k heads, no neuron) - base         # k = 1..H
    mlp[n]   = T(block with no head, n neurons) - base         # n on a grid, interpolated to 1..N

Times are medians of ``torch.utils.benchmark`` adaptive autoranges (CUDA synchronised).
The public code times every neuron count (3,072 for BERT-base); a grid of ``points``
counts, linearly interpolated, is what a CPU can afford and what the piecewise-linear fit
needs. Negative differences (noise) are clipped to 0.

Cache: ``$TSHRINK_LATENCY_CACHE/<shape key>.json`` (default ``<TSHRINK_CACHE>/latency``) holds the tables with the device
fingerprint (device type and name, CPU model, torch threads, torch version). A cached
table from another device is rebuilt (the report says so); a table given explicitly
(``fisher_latency_table=PATH``) from another device is refused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from tshrink.arch.base import Adapter
from tshrink.calibration import CalibrationData, LayerStream

SCHEMA = "tshrink-latency-lut/1"


def device_fingerprint(device: torch.device | str) -> dict[str, Any]:
    """What a latency table depends on besides the model's shape and the input size."""
    dev = torch.device(device)
    info: dict[str, Any] = {"type": dev.type, "torch": torch.__version__.split("+")[0],
                            "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
    else:
        info["name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shape_key(adapter: Adapter, batch: int, seq: int) -> dict[str, Any]:
    p, m = adapter.attn(0), adapter.mlp(0)
    return {"family": adapter.family, "model": type(adapter.model).__name__, "hidden": adapter.hidden_size,
            "units": p.units, "head_dim": p.head_dim, "group": p.group, "neurons": m.neurons,
            "dtype": str(next(adapter.model.parameters()).dtype), "batch": batch, "seq": seq}


def cache_path(key: dict[str, Any]) -> Path:
    root = (Path(os.environ["TSHRINK_LATENCY_CACHE"]) if os.environ.get("TSHRINK_LATENCY_CACHE") else
            Path(os.environ.get("TSHRINK_CACHE", Path.home() / ".cache" / "tshrink")) / "latency")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{key['family']}-{key['units']}h-{key['neurons']}n-b{key['batch']}-s{key['seq']}-{digest}.json"


def _time(fn: Any, min_run_time: float) -> float:
    from torch.utils import benchmark

    return float(benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                 num_threads=torch.get_num_threads()).blocked_autorange(
                                     min_run_time=min_run_time).median) * 1e3


def measure_tables(adapter: Adapter, *, batch: int, seq: int, device: torch.device | str, points: int = 24,
                   min_run_time: float = 0.05, timer: Any = None) -> dict[str, Any]:
    """Measure ``{"base": ms, "heads": [ms per 1..H], "neurons": [ms per 1..N]}`` (see the
    module docstring). ``timer(fn, min_run_time) -> ms`` may replace the benchmark (tests)."""
    from tshrink.surgery import prune_heads, prune_neurons

    timer = timer or _time
    dev = torch.device(device)
    vocab = int(getattr(adapter.config, "vocab_size", 100))
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    stream = LayerStream(adapter, CalibrationData([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                                                  source="latency-table"), device=dev)
    hidden, args, kwargs = stream.hidden[0].to(dev), stream.args[0], stream.kwargs[0]
    layers = adapter.layers()
    original = layers[0]
    units, neurons = adapter.attn(0).units, adapter.mlp(0).neurons

    def timed(heads: int, n: int) -> float:
        layers[0] = copy.deepcopy(original)
        try:
            prune_neurons(adapter, 0, list(range(n)))
            prune_heads(adapter, 0, list(range(heads)))
            block = layers[0].to(dev).eval()

            def run() -> Any:
                with torch.no_grad():
                    return block(hidden, *args, **kwargs)

            run.block = block  # type: ignore[attr-defined]  # what a test's fake timer prices
            run()  # warm-up
            return timer(run, min_run_time)
        finally:
            layers[0] = original

    base = timed(0, 0)
    heads = [max(timed(k, 0) - base, 0.0) for k in range(1, units + 1)]
    grid = sorted({max(1, round(neurons * i / (points - 1))) for i in range(points)} | {1, neurons})
    measured = [max(timed(0, n) - base, 0.0) for n in grid]
    full = torch.tensor(measured, dtype=torch.float64)
    x = torch.arange(1, neurons + 1, dtype=torch.float64)
    g = torch.tensor(grid, dtype=torch.float64)
    idx = torch.searchsorted(g, x).clamp(1, len(grid) - 1) if len(grid) > 1 else torch.zeros_like(x, dtype=torch.long)
    if len(grid) > 1:
        x0, x1 = g[idx - 1], g[idx]
        y0, y1 = full[idx - 1], full[idx]
        interp = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    else:
        interp = full.expand_as(x)
    return {"base": base, "heads": heads, "neurons": interp.tolist(), "neuron_grid": grid,
            "neuron_grid_ms": measured}


def load_or_measure(adapter: Adapter, *, batch: int, seq: int, device: torch.device | str,
                    path: str | None = None, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tables, provenance). ``path``: an explicit table file, refused when it was measured
    on another device or for another shape; otherwise the cache, rebuilt when its device
    differs from this run's."""
    key = shape_key(adapter, batch, seq)
    here = device_fingerprint(device)
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"fisher_latency_table {path!r}: no such file")
        data = json.loads(file.read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"fisher_latency_table {path!r} is not a tshrink latency table ({SCHEMA})")
        if data["device"] != here:
            raise ValueError(f"fisher_latency_table {path!r} was measured on {data['device']}, this run is on {here}; "
                             "measure it here (leave fisher_latency_table empty) or run on that device")
        if data["shape"] != key:
            raise ValueError(f"fisher_latency_table {path!r} is for {data['shape']}, this model and input are {key}")
        return data["tables"], {"source": str(file), "status": "given", "device": here}
    file = cache_path(key)
    status = "measured"
    if file.is_file():
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        if data.get("schema") == SCHEMA and data.get("shape") == key and data.get("device") == here:
            return data["tables"], {"source": str(file), "status": "cached", "device": here}
        if data.get("schema") == SCHEMA:
            status = f"rebuilt: the cached table was measured on {data.get('device')}, this run is on {here}"
    tables = measure_tables(adapter, batch=batch, seq=seq, device=device, **kw)
    from tshrink.checkpoint import write_json_atomic

    write_json_atomic(file, {"schema": SCHEMA, "shape": key, "device": here, "tables": tables})
    return tables, {"source": str(file), "status": status, "device": here}
