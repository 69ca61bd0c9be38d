"""Measurements shared by compare and finetune: latency, size on disk, bits per weight."""
from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .records import speedup_flag  # noqa: F401  (pure; re-exported for callers)

def latency_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch of token ids (content does not change the cost of a forward)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


PROTOCOL = ("torch.utils.benchmark blocked_autorange per model and round, models interleaved in one process "
            "(order reversed every other round), fixed thread count, warm-up passes first; per model the median "
            "and quartiles of the per-round medians; speed-up = median of the per-round paired ratios")


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str) -> Callable[[], Any]:
    """A no-argument forward pass on ``batch`` (moved to ``device`` once).

    An encoder-decoder (``config.is_encoder_decoder``, e.g. Marian) without
    ``decoder_input_ids`` gets the input ids as its target: one teacher-forced pass."""
    inputs = {k: v.to(device) for k, v in batch.items()}
    if bool(getattr(model.config, "is_encoder_decoder", False)) and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = inputs["input_ids"]
    kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    model.eval()

    def run() -> Any:
        with torch.no_grad():
            return model(**inputs, **kwargs)

    return run


def benchmark_times(fn: Callable[[], Any], *, min_run_time: float, threads: int) -> list[float]:
    """Seconds per call of ``fn``, one value per block of ``torch.utils.benchmark``'s
    adaptive ``blocked_autorange`` (it picks the calls per block; CUDA is synchronised)."""
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time)
    return [float(t) for t in m.times]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75) of ``values`` (inclusive method; one value: itself three times)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def interleaved_times(fns: dict[str, Callable[[], Any]], *, rounds: int = 5, warmup: int = 2,
                      min_run_time: float = 0.2, threads: int | None = None,
                      measure: Callable[..., list[float]] | None = None) -> dict[str, list[float]]:
    """Per callable, its per-round median milliseconds: ``warmup`` untimed calls each, then
    ``rounds`` rounds timing every callable once (``measure(fn, min_run_time=, threads=)``, default
    :func:`benchmark_times`) in an order reversed every other round, so drift of a shared machine
    hits all alike; torch's thread count pinned to ``threads`` (default: current) and restored."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"latency needs rounds >= 1 and warmup >= 0, got {rounds} / {warmup}")
    if not fns:
        raise ValueError("latency needs at least one model")
    measure = measure or benchmark_times
    names = list(fns)
    old_threads = torch.get_num_threads()
    threads = int(threads or old_threads)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    torch.set_num_threads(threads)
    try:
        for name in names:
            for _ in range(warmup):
                fns[name]()
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                times = measure(fns[name], min_run_time=min_run_time, threads=threads)
                per_round[name].append(statistics.median(times) * 1e3)
    finally:
        torch.set_num_threads(old_threads)
    return per_round


def interleaved_latency(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], device: str, *,
                        rounds: int = 5, warmup: int = 2, min_run_time: float = 0.2, threads: int | None = None,
                        reference: str | None = None,
                        measure: Callable[..., list[float]] | None = None) -> dict[str, Any]:
    """Forward latency of several models on one batch, timed interleaved in this process
    (:func:`interleaved_times`). Returns ``{"models": {name: stats}, "speedups": {name: stats}, ...}``:
    per model the median / quartiles / min / max (ms) of its per-round medians; per model other
    than ``reference`` (default: the first) the median and quartiles of the per-round ratios
    ``reference / model``.
    """
    if not models:
        raise ValueError("latency needs at least one model")
    names = list(models)
    reference = reference or names[0]
    threads = int(threads or torch.get_num_threads())
    fns = {n: _forward(m, batch, device) for n, m in models.items()}
    per_round = interleaved_times(fns, rounds=rounds, warmup=warmup, min_run_time=min_run_time, threads=threads,
                                  measure=measure)
    shape = {"batch_size": int(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1])}
    stats = {}
    for name, ms in per_round.items():
        q1, med, q3 = quartiles(ms)
        stats[name] = {"median_ms": med, "q25_ms": q1, "q75_ms": q3, "min_ms": min(ms), "max_ms": max(ms),
                       "rounds_ms": ms, "warmup": warmup, "repeats": rounds, **shape}
        if bool(getattr(models[name].config, "is_encoder_decoder", False)):  # teacher-forced over these tokens
            dec = batch.get("decoder_input_ids", batch["input_ids"])
            stats[name]["decoder_seq_len"] = int(dec.shape[1])
    speedups = {}
    for name in names:
        if name != reference:
            ratios = [a / b for a, b in zip(per_round[reference], per_round[name])]
            q1, med, q3 = quartiles(ratios)
            speedups[name] = {"median": med, "q25": q1, "q75": q3}
    return {"models": stats, "speedups": speedups, "threads": threads, "min_run_time_s": min_run_time,
            "protocol": PROTOCOL, **shape}


def latency(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str, *, warmup: int = 2,
            repeats: int = 5, min_run_time: float = 0.2, threads: int | None = None) -> dict[str, Any]:
    """Latency of one model alone (median of ``repeats`` rounds, ms); see :func:`interleaved_latency`."""
    out = interleaved_latency({"model": model}, batch, device, rounds=repeats, warmup=warmup,
                              min_run_time=min_run_time, threads=threads)
    return out["models"]["model"]


def checkpoint_bytes(path: str | Path) -> tuple[int, str]:
    """(bytes, how) of a checkpoint written by ``tshrink.checkpoint.save_pruned``.

    With the quantization plugin installed its measure is used for every checkpoint (dense
    ones too, so ratios compare like with like): ``compressed.safetensors`` + the data bytes
    of the float tensors no quant stage replaced. Without it: the safetensors files' sizes.
    """
    path = Path(path)
    try:
        from tshrink_plugins.quant.apply import compressed_size_bytes
    except ImportError:
        files = sorted(path.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files), "size of " + "+".join(f.name for f in files)
    return int(compressed_size_bytes(path)), "tshrink_plugins.quant.apply.compressed_size_bytes"


def saved_size(model: torch.nn.Module, compressed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save ``model`` (with its transform stages' compact forms) to a temporary directory
    and measure it."""
    from tshrink.checkpoint import save_pruned

    with tempfile.TemporaryDirectory(prefix="tshrink-size-") as tmp:
        save_pruned(model, Path(tmp) / "ckpt", compressed=compressed)
        size, how = checkpoint_bytes(Path(tmp) / "ckpt")
    return {"bytes": size, "measured_by": how}


def bits_per_weight(model: torch.nn.Module, transforms: dict[str, Any] | None) -> float:
    """Bits per weight of the compressed weights: the transform stages' ``bits_per_weight``
    (weighted by their ``quantized_params`` when several report), else the dtype's bits."""
    reported = [(r["bits_per_weight"], r.get("quantized_params", 1)) for r in (transforms or {}).values()
                if isinstance(r, dict) and isinstance(r.get("bits_per_weight"), (int, float))]
    if reported:
        total = sum(n for _, n in reported) or 1
        return float(sum(b * n for b, n in reported) / total)
    param = next(model.parameters())
    return float(torch.finfo(param.dtype).bits if param.is_floating_point() else torch.iinfo(param.dtype).bits)


def latency_record(dense: torch.nn.Module, pruned: torch.nn.Module | None, batches: list[dict[str, torch.Tensor]],
                   device: str, *, flops_kept: float | None = None, **kw: Any) -> dict[str, Any]:
    """The ``latency`` field of a run record: dense and pruned timed interleaved at every
    batch in ``batches`` (e.g. batch 1 and a compute-bound batch), with spread and the
    noise flag (:func:`speedup_flag`). ``pruned`` None: the dense row (speed-up 1).
    ``kw``: :func:`interleaved_latency`'s options. The top-level ``dense`` / ``pruned`` /
    ``speedup`` / ``flag`` are those of the first batch."""
    rows = []
    for batch in batches:
        models = {"dense": dense} if pruned is None else {"dense": dense, "pruned": pruned}
        out = interleaved_latency(models, batch, device, reference="dense", **kw)
        dense_stats = out["models"]["dense"]
        if pruned is None:
            row = {"dense": dense_stats, "pruned": dense_stats, "speedup": 1.0, "speedup_q25": 1.0,
                   "speedup_q75": 1.0, "flag": None}
        else:
            s = out["speedups"]["pruned"]
            row = {"dense": dense_stats, "pruned": out["models"]["pruned"], "speedup": s["median"],
                   "speedup_q25": s["q25"], "speedup_q75": s["q75"], "flag": speedup_flag(s["median"], flops_kept)}
        rows.append(dict(row, batch_size=out["batch_size"], seq_len=out["seq_len"]))
        threads, min_time, protocol = out["threads"], out["min_run_time_s"], out["protocol"]
    first = rows[0]
    return {"protocol": protocol, "threads": threads, "min_run_time_s": min_time, "flops_kept_bound": flops_kept,
            "batches": rows, "dense": first["dense"], "pruned": first["pruned"], "speedup": first["speedup"],
            "flag": first["flag"]}
