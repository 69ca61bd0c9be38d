"""``harness compare``: every method x budget on one model and task, side by side.

For each run: prune a fresh copy of the dense model (timed), count FLOPs with fvcore
(1 multiply-add = 1 FLOP) and parameters, evaluate on the task, time dense and pruned
forward passes in the same process (warm-up, repeats, median), and measure the saved
checkpoint. The dense model is always a row. Each run becomes one JSON record under
``results/runs/<task>/<model>/`` (written atomically, see :mod:`.records`); a re-run skips
the records it already has, so an interrupted compare resumes where it stopped.
"""
from __future__ import annotations

import copy
import time
from typing import Any

from tqdm.auto import tqdm

from . import records as R

FLOPS_NOTE = R.FLOPS_NOTE



def _score_key(registry: Any, spec: Any, opts: dict[str, Any]) -> Any:
    """What a recipe's scores depend on besides model, data and seed; None: nothing to score."""
    if not spec.recipe.prunes:
        return None
    stage = registry.stage("score", spec.recipe.score)
    return spec.recipe.score, repr(sorted((o.name, opts[o.name]) for o in stage.options))


def compare(*, methods: str | None, model: str | None, budgets: list[float], options: dict[str, Any],
            calib_samples: int | None = None, eval_samples: int | None = None, seq_len: int | None = None,
            data_dir: str | None = None, device: str = "cpu", dtype: str | None = "auto", seed: int = 0,
            results_dir: str = "results",
            task: str | None = None, lmeval_include: str | None = None, squad_split: str | None = None,
            num_beams: int | None = None, max_new_tokens: int | None = None, batch_size: int = 8, latency_batch: int = 1, latency_warmup: int = 2, latency_repeats: int = 5,
            leaderboard: bool = True, command: list[str] | None = None, pm: Any = None) -> list[dict[str, Any]]:
    """Run (or resume) every method x budget; print the tables; return the records.

    pm: a plugin manager (default: every installed plugin), e.g. with extra test plugins."""
    import torch

    from tshrink.models import load_model
    from tshrink.pipeline import prune

    from .leaderboard import build, render_group
    from .measure import bits_per_weight, latency, latency_batch as make_batch, saved_size
    from .run import flops_or_none, make_plan

    if batch_size < 1 or latency_batch < 1:
        raise ValueError("--batch-size and --latency-batch must be at least 1")
    plan = make_plan(methods=methods, model=model, task=task, options=options, data_dir=data_dir, device=device,
                     seq_len=seq_len, calib_samples=calib_samples, eval_samples=eval_samples,
                     lmeval_include=lmeval_include, squad_split=squad_split, num_beams=num_beams,
                     max_new_tokens=max_new_tokens, pm=pm, dtype=dtype)
    t, seq, device = plan.task, plan.seq_len, plan.device
    # ---- nothing was loaded before this line: every error above is cheap -----------
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per run is ours; no per-save / per-load bars
    dense, tok = load_model(plan.model, head=t.head, num_labels=t.num_labels, dtype=plan.dtype)
    dense.to(device)
    model_hash = R.hash_tensors(dense)
    settings = {"seq_len": seq, "eval_samples": plan.eval_samples, "batch_size": batch_size, "device": device}
    calib = (t.calibration(tok, samples=plan.calib_samples, seq_len=seq, seed=seed, batch_size=batch_size)
             if plan.needs_calibration else None)
    calib_desc = R.jsonable(calib.describe() | {"hash": R.hash_calibration(calib), "seed": seed}) if calib else None
    task_desc = {"name": t.name, "kind": t.kind, "main_metric": t.main_metric,
                 "higher_is_better": t.higher_is_better, **R.jsonable(t.info)}
    base = {"schema": R.SCHEMA, "model": {"spec": plan.model, "hash": model_hash, "architecture": type(dense).__name__},
            "task": task_desc, "settings": settings, "versions": R.versions(), "git": R.git_revision(),
            "device": R.device_info(device), "command": command, "flops_convention": FLOPS_NOTE}
    eval_kw = {"device": device, "limit": plan.eval_samples, "seq_len": seq, "batch_size": batch_size}

    dense_key = R.key_of([R.SCHEMA, "dense", model_hash, t.name, t.info["data_hash"], settings])
    todo, done = [], []
    for spec in plan.specs:
        for budget in budgets:
            opts = plan.registry.resolve_options(spec, plan.options[spec.name])
            key = R.key_of([R.SCHEMA, model_hash, t.name, t.info["data_hash"], settings, calib_desc, spec.name,
                            str(spec.recipe), opts, budget, seed])
            found = R.find_record(results_dir, t.name, plan.model, key)
            (done.append(found) if found else todo.append((spec, budget, key)))
    dense_rec = R.find_record(results_dir, t.name, plan.model, dense_key)
    for rec in done:
        print(f"[skip] {rec['method']} @ {rec['budget']:g}: already recorded ({rec['record_key']})")

    lat_batch = make_batch(int(dense.config.vocab_size), latency_batch, seq, seed)
    lat_kw = {"warmup": latency_warmup, "repeats": latency_repeats}
    needed = bool(todo) or dense_rec is None
    if needed:
        t.on_dense(dense, tok, **eval_kw)
    dense_fv = flops_or_none(dense, seq) if needed else None
    dense_params = sum(p.numel() for p in dense.parameters())
    dense_lat = latency(dense, lat_batch, device, **lat_kw) if needed else None
    if dense_rec is None:
        start = time.perf_counter()
        ev = t.evaluate(dense, tok, **eval_kw)
        size = saved_size(dense)
        dense_rec = R.jsonable(dict(
            base, record_key=dense_key, method="dense", recipe="(dense)", options={}, budget=1.0, seed=seed,
            calibration=None, metrics=ev.metrics, main_metric=ev.info.get("main_metric", t.main_metric),
            evaluation=dict(ev.info, time_s=time.perf_counter() - start),
            flops={"fvcore": dense_fv, "fvcore_dense": dense_fv, "kept": 1.0, "analytic_kept": 1.0, "seq_len": seq},
            params=dense_params, params_dense=dense_params,
            latency={"pruned": dense_lat, "dense": dense_lat, "speedup": 1.0},
            size=dict(size, dense_bytes=size["bytes"], compression_ratio=1.0, bits_per_weight=bits_per_weight(dense, None)),
            prune={"time_s": 0.0}))
        R.write_record(results_dir, dense_rec)
    dense_bytes = dense_rec["size"]["bytes"]

    out = [dense_rec] + done
    score_cache: dict[Any, tuple[Any, float]] = {}
    for spec, budget, key in tqdm(todo, desc="compare", unit="run", disable=not todo):
        opts = plan.registry.resolve_options(spec, plan.options[spec.name])
        tqdm.write(f"[run] {spec.name} @ {budget:g}")
        net = copy.deepcopy(dense)
        # scores depend on the dense model, calibration, seed and score options, not on the budget
        # (hook contract): computed once per score stage, their time counted in every run's prune time
        skey = _score_key(plan.registry, spec, opts)
        cached = score_cache.get(skey)
        start = time.perf_counter()
        res = prune(net, spec, budget, calib=calib, seq_len=seq, options=plan.options[spec.name], pm=plan.pm,
                    device=device, seed=seed, progress=True, scores=cached[0] if cached else None)
        prune_time = time.perf_counter() - start
        if cached:
            prune_time += cached[1]
            res.report["timings_s"][f"score:{spec.recipe.score}"] = cached[1]
        elif skey is not None:
            score_cache[skey] = (res.scores, res.report["timings_s"][f"score:{spec.recipe.score}"])
        fv = flops_or_none(net, seq)
        start = time.perf_counter()
        ev = t.evaluate(net, tok, **eval_kw)
        eval_time = time.perf_counter() - start
        lat = latency(net, lat_batch, device, **lat_kw)
        size = saved_size(net, res.compressed)
        rec = R.jsonable(dict(
            base, record_key=key, method=spec.name, recipe=str(spec.recipe), options=opts, budget=budget, seed=seed,
            calibration=calib_desc, metrics=ev.metrics, main_metric=ev.info.get("main_metric", t.main_metric),
            evaluation=dict(ev.info, time_s=eval_time),
            flops={"fvcore": fv, "fvcore_dense": dense_fv, "kept": fv / dense_fv if fv and dense_fv else 1.0,
                   "analytic_kept": res.report["flops_kept"], "seq_len": seq},
            params=sum(p.numel() for p in net.parameters()), params_dense=dense_params,
            latency={"pruned": lat, "dense": dense_lat, "speedup": dense_lat["median_ms"] / lat["median_ms"]},
            size=dict(size, dense_bytes=dense_bytes, compression_ratio=dense_bytes / max(size["bytes"], 1),
                      bits_per_weight=bits_per_weight(net, res.report["transforms"])),
            prune={"time_s": prune_time, "timings_s": res.report["timings_s"], "widths": res.report["widths_after"],
                   "transforms": res.report["transforms"], "stages": res.report["stages"]}))
        R.write_record(results_dir, rec)
        out.append(rec)
        del net
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(render_group(out))
    if leaderboard:
        path = build(results_dir)
        print(f"\nleaderboard: {path}")
    return out
