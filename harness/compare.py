"""``harness compare``: every method x budget on one model, side by side.

For each run: prune a fresh copy of the dense model (timed), count FLOPs with fvcore
(1 multiply-add = 1 FLOP), count parameters, evaluate, and time dense vs pruned forward
passes in the same process. Each run becomes one JSON record under ``results/runs/``
(written atomically); a re-run skips the records it already has.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from .run import DEFAULTS, build_calibration, model_kind, resolve_data_dir

FLOPS_NOTE = "FLOPs: fvcore, 1 multiply-add = 1 FLOP, backbone only (no embeddings / task head), per sequence"


def _hash_batches(calib: Any) -> str:
    h = hashlib.sha256()
    for b in calib.batches:
        h.update(b["input_ids"].numpy().tobytes())
    return h.hexdigest()[:16]


def _hash_model(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()[:16]


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tshrink", "torch", "transformers", "fvcore", "pluggy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, batches: Any, device: str) -> dict[str, float]:
    """Mean next-token NLL over the evaluation windows, and its perplexity."""
    nll, count = 0.0, 0
    for b in batches.batches:
        ids = b["input_ids"].to(device)
        logits = model(input_ids=ids, attention_mask=b["attention_mask"].to(device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (batch, seq-1, vocab)
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "eval_tokens": count}


@torch.no_grad()
def _pooled(model: torch.nn.Module, batches: Any, device: str) -> list[torch.Tensor]:
    out = []
    for b in batches.batches:
        mask = b["attention_mask"].to(device)
        h = model(**{k: v.to(device) for k, v in b.items() if k != "labels"})[0]  # (batch, seq, hidden)
        out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return out


def evaluate_encoder(model: torch.nn.Module, batches: Any, device: str, reference: list[torch.Tensor]) -> dict[str, float]:
    """Agreement of mean-pooled embeddings with the dense model's (no task head needed)."""
    cos = [torch.nn.functional.cosine_similarity(a, r.to(device), dim=-1) for a, r in zip(_pooled(model, batches, device), reference)]
    return {"embedding_cosine": torch.cat(cos).mean().item()}


@torch.no_grad()
def latency_ms(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str, *, warmup: int = 2,
               repeats: int = 5) -> float:
    """Median forward time in milliseconds of one batch (after ``warmup`` passes)."""
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(**inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def compare(*, methods: str | None, model: str, budgets: list[float], options: dict[str, Any],
            calib_samples: int | None, eval_samples: int | None, seq_len: int | None, data_dir: str | None,
            device: str, seed: int, results_dir: str) -> list[dict[str, Any]]:
    """Run every method x budget; print the table; return the records."""
    from tabulate import tabulate

    from tshrink.checkpoint import write_json_atomic
    from tshrink.flops import measure_flops
    from tshrink.manager import get_plugin_manager
    from tshrink.models import load_model
    from tshrink.pipeline import prune
    from tshrink.registry import Registry

    pm = get_plugin_manager()
    reg = Registry(pm)
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else [
        n for n in sorted(reg.methods) if reg.methods[n].compare_by_default]
    specs = [reg.method(n) for n in names]  # unknown names fail here, before any work
    for spec in specs:
        reg.resolve_options(spec, {k: v for k, v in options.items() if k in reg.options(spec)})
    data = resolve_data_dir(data_dir)
    dense, tok = load_model(model)
    dense.to(device)
    kind = model_kind(dense)
    d = DEFAULTS[kind]
    seq = seq_len or d.seq_len
    calib = build_calibration(tok, kind, samples=calib_samples or d.calib_samples, seq_len=seq, data=data)
    evalset = build_calibration(tok, kind, samples=eval_samples or d.eval_samples, seq_len=seq, data=data,
                                part="evaluation")
    reference = _pooled(dense, evalset, device) if kind == "encoder" else None

    def evaluate(net: torch.nn.Module) -> dict[str, float]:
        return evaluate_lm(net, evalset, device) if kind == "causal" else evaluate_encoder(net, evalset, device, reference)

    lat_batch = evalset.batches[0]
    base = {
        "model": model, "model_hash": _hash_model(dense), "kind": kind, "seq_len": seq,
        "calibration": calib.describe() | {"hash": _hash_batches(calib)},
        "evaluation": evalset.describe() | {"hash": _hash_batches(evalset)},
        "seed": seed, "device": device, "versions": _versions(), "git_revision": _git_revision(),
        "flops_convention": FLOPS_NOTE,
    }
    runs = Path(results_dir) / "runs"
    dense_fv = measure_flops(dense, seq)["total"]
    dense_params = sum(p.numel() for p in dense.parameters())
    dense_lat = latency_ms(dense, lat_batch, device)
    records = [dict(base, method="dense", recipe="(dense)", budget=1.0, flops=dense_fv, flops_kept=1.0,
                    params=dense_params, metrics=evaluate(dense), latency_ms=dense_lat, speedup=1.0, prune_time_s=0.0)]
    for spec in specs:
        opts = {k: v for k, v in options.items() if k in reg.options(spec)}
        for budget in budgets:
            key = hashlib.sha256(json.dumps([base["model_hash"], base["calibration"]["hash"], base["evaluation"]["hash"],
                                             spec.name, str(spec.recipe), opts, budget, seed, seq],
                                            sort_keys=True).encode()).hexdigest()[:16]
            file = runs / f"{spec.name.replace('=', '-').replace(',', '_')}-{budget:g}-{key}.json"
            if file.exists():
                records.append(json.loads(file.read_text()))
                print(f"[skip] {file.name} already recorded")
                continue
            net = copy.deepcopy(dense)
            t = time.perf_counter()
            res = prune(net, spec, budget, calib=calib, seq_len=seq, options=opts, pm=pm, device=device, seed=seed)
            prune_time = time.perf_counter() - t
            fv = measure_flops(net, seq)["total"]
            lat = latency_ms(net, lat_batch, device)
            rec = dict(base, method=spec.name, recipe=str(spec.recipe), options=res.report["options"], budget=budget,
                       flops=fv, flops_kept=fv / dense_fv, params=sum(p.numel() for p in net.parameters()),
                       metrics=evaluate(net), latency_ms=lat, dense_latency_ms=dense_lat, speedup=dense_lat / lat,
                       prune_time_s=prune_time, widths=res.report["widths_after"], transforms=res.report["transforms"],
                       record_key=key)
            write_json_atomic(file, rec)
            records.append(rec)
            del net
    metric_keys = sorted({k for r in records for k in r["metrics"] if k not in ("nll", "eval_tokens")})
    rows = [[r["method"], r["budget"], f"{r['flops_kept']:.3f}", f"{r['params'] / 1e6:.2f}M"]
            + [f"{r['metrics'][k]:.4g}" for k in metric_keys] + [f"{r['speedup']:.2f}x", f"{r['prune_time_s']:.1f}"]
            for r in records]
    print(tabulate(rows, headers=["method", "budget", "FLOPs kept", "params", *metric_keys, "speedup", "prune s"],
                   tablefmt="github"))
    print(f"\n{FLOPS_NOTE}; seq_len={seq}; model={model}; calibration={calib.source} "
          f"x{calib.n_examples}; evaluation={evalset.source} x{evalset.n_examples}")
    return records
