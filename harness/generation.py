"""Generation metrics of decoders: decoding throughput with the KV cache, KV-cache bytes per
token, peak memory, parameters -- dense and pruned measured the way :mod:`.measure` times
prefill latency (``torch.utils.benchmark`` blocks, models interleaved, order reversed every
other round, pinned threads, warm-up first, spread over rounds, noise flag above the
physical limit).

One timed call is a greedy generation from a fixed random prompt: one prefill of
``prompt_len`` tokens (logits of the last position only) then ``new_tokens - 1`` cached
decode steps of one token per sequence, so ``batch * new_tokens`` tokens are generated.
Throughput = generated tokens / seconds of that call (prefill included: with a short
prompt it is one step among ``new_tokens``).

Physical limit of a speed-up: a decode step costs at least max(FLOPs / peak rate, bytes
read / bandwidth) and both shrink by at most their own ratio, so a pruned model cannot
decode faster than ``max(1 / FLOPs kept, dense bytes / pruned bytes)`` times the dense one,
bytes = the weights every step reads (all parameters but an untied input embedding) + the
KV cache at the mean context length. Above that the ratio is the machine's noise.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from .measure import interleaved_times, quartiles

PROTOCOL = ("greedy generation from a fixed random prompt (prefill of prompt_len tokens, then new_tokens - 1 "
            "cached one-token decode steps), timed as the latency protocol: torch.utils.benchmark blocked_autorange "
            "per model and round, dense and pruned interleaved (order reversed every other round), fixed thread "
            "count, warm-up calls first; tokens/s = batch * new_tokens / seconds per call, median and quartiles of "
            "the per-round figures; speed-up = median of the per-round paired ratios; 'noise' above "
            "max(1 / FLOPs kept, dense / pruned bytes read per decode step)")


def default_generation_batches(device: str) -> tuple[int, ...]:
    """Batch 1 (latency-bound decoding) and a larger batch: 32 on a GPU, 8 on the CPU (cheap)."""
    gpu = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return (1, 32) if gpu else (1, 8)


def prompt_ids(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """(batch, prompt_len) fixed random token ids (content does not change the cost)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(min(5, vocab_size - 1), vocab_size, (batch_size, prompt_len), generator=g)


def greedy_decode(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, Any]:
    """(generated ids (batch, new_tokens), the KV cache) of greedy decoding with the cache."""
    import inspect

    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def held(out: Any) -> Any:
        return out.get("cache", None) or out.get("past_key_values", None)

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **extra)
        nxt = out.logits[:, -1:].argmax(-1)  # (batch, 1)
        tokens, cache = [nxt], held(out)
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, use_cache=True, **{key: cache})
            nxt, cache = out.logits[:, -1:].argmax(-1), held(out)
            tokens.append(nxt)
    return torch.cat(tokens, 1), cache


def cache_bytes(cache: Any) -> int | None:
    """Bytes of the key and value tensors a transformers cache holds (None: unknown layout)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter but an untied input embedding
    (a step reads one row of it)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = emb.weight if emb is not None and (out is None or out.weight is not emb.weight) else None
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not skip)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _peak(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, device: str) -> dict[str, Any]:
    """Peak memory of one generation at this batch: the allocator's high-water mark on a GPU;
    on the CPU (no allocator statistics) the model's tensors + the KV cache it ended with."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _, cache = greedy_decode(model, ids, new_tokens)
        torch.cuda.synchronize(device)
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kv_bytes": cache_bytes(cache),
                "measured_by": "torch.cuda.max_memory_allocated (weights + cache + activations)"}
    _, cache = greedy_decode(model, ids, new_tokens)
    kv = cache_bytes(cache) or 0
    return {"bytes": model_bytes(model) + kv, "kv_bytes": kv,
            "measured_by": "CPU: bytes of the model's tensors + of the KV cache after generation (activations and "
                           "allocator overhead not counted)"}


def generation_record(dense: torch.nn.Module, pruned: torch.nn.Module | None, device: str, *,
                      batches: tuple[int, ...] = (1, 8), prompt_len: int = 32, new_tokens: int = 16,
                      flops_kept: float | None = None, rounds: int = 5, warmup: int = 2, min_run_time: float = 0.2,
                      threads: int | None = None, seed: int = 0,
                      measure: Callable[..., list[float]] | None = None) -> dict[str, Any]:
    """The ``generation`` field of a decoder's run record (``pruned`` None: the dense row).

    Per batch size: tokens/s of dense and pruned (median, quartiles over rounds), the speed-up
    (median and quartiles of the per-round paired ratios), its physical bound and flag. Also the
    KV-cache bytes per token measured from the cache after a generation, the peak memory of a
    generation at the largest batch and the parameter counts."""
    if new_tokens < 1 or prompt_len < 1:
        raise ValueError(f"generation needs prompt_len >= 1 and new_tokens >= 1, got {prompt_len} / {new_tokens}")
    models = {"dense": dense} if pruned is None else {"dense": dense, "pruned": pruned}
    for m in models.values():
        m.eval()
    vocab = int(dense.config.vocab_size)
    context = prompt_len + (new_tokens - 1) / 2  # mean tokens in the cache over the steps
    rows, kv_per_token, peaks = [], {}, {}
    for b in dict.fromkeys(batches):
        ids = prompt_ids(vocab, b, prompt_len, seed).to(device)
        fns = {name: (lambda m=m: greedy_decode(m, ids, new_tokens)) for name, m in models.items()}
        per_round = interleaved_times(fns, rounds=rounds, warmup=warmup, min_run_time=min_run_time,
                                      threads=threads, measure=measure)
        tps = {name: [b * new_tokens / (ms / 1e3) for ms in values] for name, values in per_round.items()}
        row: dict[str, Any] = {"batch_size": b}
        for name in models:
            q1, med, q3 = quartiles(tps[name])
            row[name] = {"tokens_per_s": med, "q25": q1, "q75": q3, "median_ms": statistics.median(per_round[name]),
                         "rounds_tokens_per_s": tps[name]}
        for name, m in models.items():  # the cache of this batch: bytes per token (batch * context tokens)
            _, cache = greedy_decode(m, ids, 1)
            held = cache_bytes(cache)
            if held is not None:
                kv_per_token[name] = held / (b * prompt_len)
        if pruned is None:
            row.update(pruned=row["dense"], speedup=1.0, speedup_q25=1.0, speedup_q75=1.0, bound=None, flag=None)
        else:
            ratios = [a / c for a, c in zip(per_round["dense"], per_round["pruned"])]
            q1, med, q3 = quartiles(ratios)
            step = {n: weight_bytes(m) + kv_per_token.get(n, 0) * b * context for n, m in models.items()}
            bound = max(step["dense"] / max(step["pruned"], 1.0), 1.0 / flops_kept if flops_kept else 1.0)
            row.update(speedup=med, speedup_q25=q1, speedup_q75=q3, bound=bound,
                       flag="noise" if med > bound else None)
        rows.append(row)
    big = max(batches)
    ids = prompt_ids(vocab, big, prompt_len, seed).to(device)
    for name, m in models.items():
        peaks[name] = dict(_peak(m, ids, new_tokens, device), batch_size=big, tokens=prompt_len + new_tokens - 1)
    if pruned is None:
        kv_per_token["pruned"], peaks["pruned"] = kv_per_token.get("dense"), peaks["dense"]
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    params.setdefault("pruned", params["dense"])
    return {"protocol": PROTOCOL, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "threads": int(threads or torch.get_num_threads()),
            "rounds": rounds, "warmup": warmup, "min_run_time_s": min_run_time, "device": device, "batches": rows,
            "kv_cache_bytes_per_token": kv_per_token, "peak_memory": peaks, "params": params}
