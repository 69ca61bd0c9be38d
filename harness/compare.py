"""``harness compare``: every method x budget on one model and task, side by side.

For each run: prune a fresh copy of the dense model (timed), count FLOPs with fvcore
(1 multiply-add = 1 FLOP) and parameters, evaluate on the task, time dense and pruned
forward passes interleaved in the same process, and measure the saved checkpoint. The dense
model is always a row. Each run becomes one JSON record under ``<results>/runs/<task>/<model>/``
(written atomically by the driver, see :mod:`.records`); a re-run skips the records it already
has, so an interrupted compare resumes where it stopped.

The work is split so that an executor can place it anywhere: a :class:`Session` (one per
process) loads the dense model, tokenizer and calibration from :class:`Settings` alone and
answers three questions -- the record keys (:meth:`Session.describe`), the dense row
(:meth:`Session.dense_record`) and one run (:meth:`Session.run`, which returns a record, a
failure record included, and never raises). The serial executor keeps one Session in this
process; ``--executor ray`` (:mod:`.ray_executor`) builds one per Ray worker.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import records as R

FLOPS_NOTE = R.FLOPS_NOTE
#: The steps of one run, in order (a progress bar per run counts them).
STEPS = ("prune", "measure", "evaluate", "latency", "generation", "size")


@dataclass(frozen=True)
class Settings:
    """Everything ``compare`` was asked for: plain values only, so that another process (a Ray
    worker) rebuilds exactly the same :class:`Session` from it. ``plugins``: extra plugins as
    importable ``module:attribute`` strings (installed entry points are always loaded)."""

    methods: str | None
    model: str | None
    budgets: tuple[float, ...]
    options: tuple[tuple[str, Any], ...] = ()
    calib_samples: int | None = None
    eval_samples: int | None = None
    seq_len: int | None = None
    data_dir: str | None = None
    device: str = "cpu"
    dtype: str | None = "auto"
    seed: int = 0
    task: str | None = None
    lmeval_include: str | None = None
    squad_split: str | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 8
    latency_batch: tuple[int, ...] = (1, 32)
    latency_warmup: int = 2
    latency_repeats: int = 5
    latency_min_time: float = 0.2
    latency_threads: int | None = None
    #: decoders: generation throughput at these batch sizes (() = none), prompt and generated tokens
    generation_batch: tuple[int, ...] = (1, 8)
    generation_prompt: int = 32
    generation_tokens: int = 16
    #: evaluation through accelerate's device_map dispatch (None: the model on --device), its max memory
    eval_device_map: str | None = None
    eval_max_memory: str | None = None
    #: the prune's placement (as ``harness prune``): usable device memory, layer offload auto|always|never
    device_memory: str | None = None
    offload: str = "auto"
    flops_seq_len: str | int = "padded"
    command: tuple[str, ...] | None = None
    plugins: tuple[str, ...] = ()

    def check(self) -> None:
        """ValueError for values no run could use (before anything is loaded)."""
        from .dispatch import check_device_map, parse_max_memory

        check_device_map(self.eval_device_map)
        parse_max_memory(self.eval_max_memory)
        if self.eval_max_memory and not check_device_map(self.eval_device_map):
            raise ValueError("--eval-max-memory needs --eval-device-map (e.g. auto)")
        if self.offload not in ("auto", "always", "never"):
            raise ValueError(f"--offload {self.offload!r} is not one of auto, always, never")
        if self.batch_size < 1 or not self.latency_batch or min(self.latency_batch) < 1:
            raise ValueError(f"--batch-size and --latency-batch must be at least 1, got {self.batch_size} / "
                             f"{list(self.latency_batch)}")
        if (self.generation_batch and min(self.generation_batch) < 1) or self.generation_prompt < 1 \
                or self.generation_tokens < 0:
            raise ValueError(f"--gen-batch must be positive batch sizes (or 0 for none), --gen-prompt at least 1 "
                             f"and --gen-tokens at least 0, got {list(self.generation_batch)} / "
                             f"{self.generation_prompt} / {self.generation_tokens}")

    def plan(self, pm: Any = None, *, device: str | None = None) -> Any:
        """The validated plan (:func:`.run.make_plan`); loads no model."""
        from .run import make_plan

        return make_plan(methods=self.methods, model=self.model, task=self.task, options=dict(self.options),
                         data_dir=self.data_dir, device=device or self.device, seq_len=self.seq_len,
                         calib_samples=self.calib_samples, eval_samples=self.eval_samples,
                         lmeval_include=self.lmeval_include, squad_split=self.squad_split, num_beams=self.num_beams,
                         max_new_tokens=self.max_new_tokens, pm=pm or plugin_manager(self.plugins), dtype=self.dtype)


def default_latency_batches(device: str) -> tuple[int, ...]:
    """Batch 1 and a compute-bound batch of 32 on a GPU; batch 1 on the CPU, where one sequence of
    ``seq_len`` tokens already keeps the cores busy (a batch of 32 would cost minutes per timing)."""
    import torch

    gpu = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return (1, 32) if gpu else (1,)


def plugin_manager(plugins: tuple[str, ...] = ()) -> Any:
    """Every installed plugin plus ``plugins`` ("module:attribute", imported here)."""
    import importlib

    from tshrink.manager import get_plugin_manager

    objects = []
    for ref in plugins:
        module, _, attr = ref.partition(":")
        obj = importlib.import_module(module)
        objects.append(getattr(obj, attr) if attr else obj)
    return get_plugin_manager(plugins=objects)


def _score_key(registry: Any, spec: Any, opts: dict[str, Any]) -> Any:
    """What a recipe's scores depend on besides model, data and seed; None: nothing to score."""
    if not spec.recipe.prunes:
        return None
    stage = registry.stage("score", spec.recipe.score)
    return spec.recipe.score, repr(sorted((o.name, opts[o.name]) for o in stage.options))


@dataclass
class Run:
    """One method x budget to run: what the driver needs to schedule it and to record a failure."""

    method: str
    budget: float
    key: str
    score_key: Any
    head: dict[str, Any] = field(repr=False)  # the record's fields known before the run


class Session:
    """A comparison's loaded state in one process: plan, dense model, tokenizer, calibration.

    Built from :class:`Settings` alone (``pm`` only for in-process callers with plugin objects);
    every process that builds it from the same settings computes the same keys."""

    def __init__(self, settings: Settings, pm: Any = None, *, executor: dict[str, Any] | None = None) -> None:
        from transformers.utils import logging as hf_logging

        from tshrink.models import load_model

        from .measure import latency_batch as make_batch
        from .run import build_calibration, parse_pricing, pricing_length

        s = self.settings = settings
        s.check()
        pricing = parse_pricing(s.flops_seq_len)
        self.plan = plan = s.plan(pm)
        t, seq = self.task, self.seq = plan.task, plan.seq_len
        self.device = device = plan.device  # resolved: cpu, cuda:N
        max_pos = getattr(plan.config, "max_position_embeddings", None)
        if (plan.task.model_kind == "causal" and s.generation_batch and s.generation_tokens > 0 and max_pos
                and s.generation_prompt + s.generation_tokens > max_pos):
            raise ValueError(f"--gen-prompt {s.generation_prompt} + --gen-tokens {s.generation_tokens} is longer "
                             f"than model {plan.model!r}'s context ({max_pos} positions); give at most {max_pos} "
                             f"tokens in all, or --gen-tokens 0")
        from .dispatch import check_device_map, parse_max_memory
        from .run import plan_placement_for

        # on the CPU the plain path unless asked: free host memory must not silently change what is timed
        asked = s.device_memory is not None or s.offload != "auto" or device.startswith("cuda")
        self.placement = (plan_placement_for(plan, batch_size=s.batch_size, device_memory=s.device_memory,
                                             offload=s.offload) if asked else None)
        self.offloaded = bool(self.placement is not None and self.placement.layer_offload)
        self.eval_map = check_device_map(s.eval_device_map) or ("auto" if self.offloaded else None)
        self.eval_memory = parse_max_memory(s.eval_max_memory)
        # ---- nothing was loaded before this line: every error above is cheap -----------
        hf_logging.disable_progress_bar()  # one bar per run is ours; no per-save / per-load bars
        self.dense, self.tok = load_model(plan.model, head=t.head, num_labels=t.num_labels, dtype=plan.dtype)
        if not self.offloaded:  # a model that does not fit stays on the host: prune streams its layers
            self.dense.to(device)
        model_hash = R.hash_tensors(self.dense)
        self.record_settings = {"seq_len": seq, "eval_samples": plan.eval_samples, "batch_size": s.batch_size,
                                "device": device}
        if self.eval_map:  # how the evaluation was placed (same figures as the plain path: tested)
            self.record_settings["eval_device_map"] = {"map": self.eval_map, "max_memory": s.eval_max_memory}
        self.calib = build_calibration(plan, self.tok, seed=s.seed, batch_size=s.batch_size)
        self.calib_desc = (R.jsonable(self.calib.describe() | {"hash": R.hash_calibration(self.calib), "seed": s.seed})
                           if self.calib else None)
        self.price_len, self.price_desc = pricing_length(pricing, seq, self.calib, lambda: t.calibration(
            self.tok, samples=plan.calib_samples, seq_len=seq, seed=s.seed, batch_size=s.batch_size))
        if pricing != "padded":  # "padded" is the length records were priced at before the option existed
            self.record_settings["flops_seq_len"] = self.price_desc
        task_desc = {"name": t.name, "kind": t.kind, "main_metric": t.main_metric,
                     "higher_is_better": t.higher_is_better, **R.jsonable(t.info)}
        self.base = {"schema": R.SCHEMA,
                     "model": {"spec": plan.model, "hash": model_hash, "architecture": type(self.dense).__name__},
                     "task": task_desc, "settings": self.record_settings, "versions": R.versions(),
                     "git": R.git_revision(), "device": R.device_info(device),
                     "command": list(s.command) if s.command else None, "flops_convention": FLOPS_NOTE,
                     "executor": executor or {"kind": "serial"}}
        self.eval_kw = {"device": device, "limit": plan.eval_samples, "seq_len": seq, "batch_size": s.batch_size}
        self.lat_batches = [make_batch(int(self.dense.config.vocab_size), b, seq, s.seed)
                            for b in dict.fromkeys(s.latency_batch)]
        self.lat_kw = {"warmup": s.latency_warmup, "rounds": s.latency_repeats, "min_run_time": s.latency_min_time,
                       "threads": s.latency_threads}
        self.gen_kw = (dict(self.lat_kw, batches=tuple(s.generation_batch), prompt_len=s.generation_prompt,
                            new_tokens=s.generation_tokens, seed=s.seed)
                       if t.model_kind == "causal" and s.generation_batch and s.generation_tokens > 0 else None)
        self._dense_ready = False
        self._dense_fv: int | None = None
        self._dense_bytes: int | None = None

    # -- keys -------------------------------------------------------------------------------
    @property
    def dense_key(self) -> str:
        t = self.task
        return R.key_of([R.SCHEMA, "dense", self.base["model"]["hash"], t.name, t.info["data_hash"],
                         self.record_settings])

    def runs(self) -> list[Run]:
        """Every method x budget, in order, with its record key (what makes a record reusable)."""
        t, plan, s = self.task, self.plan, self.settings
        out = []
        for spec in plan.specs:
            opts = plan.registry.resolve_options(spec, plan.options[spec.name])
            for budget in s.budgets:
                key = R.key_of([R.SCHEMA, self.base["model"]["hash"], t.name, t.info["data_hash"],
                                self.record_settings, self.calib_desc, spec.name, str(spec.recipe), opts, budget,
                                s.seed])
                head = dict(self.base, record_key=key, method=spec.name, recipe=str(spec.recipe), options=opts,
                            budget=budget, seed=s.seed, calibration=self.calib_desc)
                out.append(Run(spec.name, budget, key, _score_key(plan.registry, spec, opts), R.jsonable(head)))
        return out

    def describe(self) -> dict[str, Any]:
        """What the driver needs to decide what to run: the task, model spec, keys and record heads."""
        return {"task": self.task.name, "model": self.plan.model, "dense_key": self.dense_key, "runs": self.runs()}

    # -- work -------------------------------------------------------------------------------
    def _ready(self) -> None:
        from .run import flops_or_none

        if not self._dense_ready:
            self.task.on_dense(self.dense, self.tok, **self.eval_kw)
            self._dense_fv = flops_or_none(self.dense, self.seq)
            self._dense_ready = True

    def dense_bytes(self) -> int:
        from .measure import saved_size

        if self._dense_bytes is None:
            self._dense_bytes = saved_size(self.dense)["bytes"]
        return self._dense_bytes

    def _evaluate(self, model: Any) -> Any:
        """The task's evaluation on ``model``: on the device, or (``--eval-device-map``, and always under
        layer offload) dispatched by accelerate over the devices, the CPU and the disk."""
        if not self.eval_map:
            return self.task.evaluate(model, self.tok, **self.eval_kw)
        from .dispatch import dispatched

        if self.offloaded:  # the prune left the layers on the host and the rest on the device
            model.to("cpu")
        with dispatched(model, self.eval_map, self.eval_memory) as info:
            ev = self.task.evaluate(model, self.tok, **dict(self.eval_kw, device=info["input_device"]))
        ev.info["dispatch"] = {k: info[k] for k in ("engine", "input_device", "disk_modules")} | {
            "devices": sorted(set(info["device_map"].values()))}
        return ev

    def _latency(self, pruned: Any, kept: float | None) -> dict[str, Any]:
        from .measure import latency_record

        if self.offloaded:
            return {"skipped": "the model does not fit on the device (layer offload): not timed"}
        return latency_record(self.dense, pruned, self.lat_batches, self.device, flops_kept=kept, **self.lat_kw)

    def _generation(self, pruned: Any, kept: float | None) -> dict[str, Any] | None:
        """Decoders: :func:`.generation.generation_record` of dense vs ``pruned`` (None: the dense row)."""
        if self.gen_kw is None:
            return None
        if self.offloaded:
            return {"skipped": "the model does not fit on the device (layer offload): not timed"}
        from .generation import generation_record

        return generation_record(self.dense, pruned, self.device, flops_kept=kept, **self.gen_kw)

    def dense_record(self) -> dict[str, Any]:
        from .measure import bits_per_weight, latency_record, saved_size

        self._ready()
        t, dense, fv = self.task, self.dense, self._dense_fv
        start = time.perf_counter()
        ev = self._evaluate(dense)
        size = saved_size(dense)
        self._dense_bytes = size["bytes"]
        params = sum(p.numel() for p in dense.parameters())
        return R.jsonable(dict(
            self.base, record_key=self.dense_key, method="dense", recipe="(dense)", options={}, budget=1.0,
            seed=self.settings.seed, calibration=None, metrics=ev.metrics,
            main_metric=ev.info.get("main_metric", t.main_metric),
            evaluation=dict(ev.info, time_s=time.perf_counter() - start),
            flops={"fvcore": fv, "fvcore_dense": fv, "kept": 1.0, "analytic_kept": 1.0, "seq_len": self.seq},
            params=params, params_dense=params,
            latency=self._latency(None, None), generation=self._generation(None, None),
            size=dict(size, dense_bytes=size["bytes"], compression_ratio=1.0,
                      bits_per_weight=bits_per_weight(dense, None)),
            prune={"time_s": 0.0}))

    def run(self, run: Run, scores: tuple[Any, float] | None = None, *, progress: bool = True,
            step: Callable[[str], None] | None = None) -> tuple[dict[str, Any], tuple[Any, float] | None]:
        """(record, (scores, score seconds) or None). Never raises: a failure becomes a record with
        ``status: "failed"``, the stage and the error. ``scores``: this recipe's score-stage output from
        an earlier run with the same score key (scores do not depend on the budget: hook contract), whose
        time is counted in this run's prune time. ``step(name)`` is called as each of :data:`STEPS` starts."""
        import torch

        from tshrink.pipeline import prune

        from .measure import bits_per_weight, latency_record, saved_size
        from .run import analytic_kept, flops_or_none

        step = step or (lambda name: None)
        plan, s = self.plan, self.settings
        # the run's own process, host and executor (the head was made where the keys were computed)
        head = {**run.head, **R.jsonable({k: self.base[k] for k in ("device", "executor", "versions", "git")})}
        spec = next(sp for sp in plan.specs if sp.name == run.method)
        net = copy.deepcopy(self.dense)
        where = ["prune"]  # where a failure happened: prune (a StageError names the stage), evaluate, measure
        computed = None
        try:
            self._ready()
            step("prune")
            start = time.perf_counter()
            res = prune(net, spec, run.budget, calib=self.calib, seq_len=self.price_len,
                        options=plan.options[spec.name], pm=plan.pm, device=self.device, seed=s.seed,
                        placement=self.placement,
                        progress=progress, scores=scores[0] if scores else None)
            prune_time = time.perf_counter() - start
            timings = res.report["timings_s"]
            if scores:
                prune_time += scores[1]
                timings[f"score:{spec.recipe.score}"] = scores[1]
            elif run.score_key is not None:
                computed = (res.scores, timings[f"score:{spec.recipe.score}"])
            where[0] = "measure"
            step("measure")
            fv, dense_fv = flops_or_none(net, self.seq), self._dense_fv
            kept = fv / dense_fv if fv and dense_fv else None
            where[0] = "evaluate"
            step("evaluate")
            start = time.perf_counter()
            ev = self._evaluate(net)
            eval_time = time.perf_counter() - start
            where[0] = "measure"
            step("latency")
            lat = self._latency(net, kept)
            step("generation")
            gen = self._generation(net, kept)
            step("size")
            size, dense_bytes = saved_size(net, res.compressed), self.dense_bytes()
        except Exception as err:  # noqa: BLE001 - one failing method never stops the others
            return R.jsonable(dict(head, status="failed", failure=R.failure(err, where[0]), metrics={})), None
        finally:
            del net
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        rec = R.jsonable(dict(
            head, metrics=ev.metrics, main_metric=ev.info.get("main_metric", self.task.main_metric),
            evaluation=dict(ev.info, time_s=eval_time),
            flops={"fvcore": fv, "fvcore_dense": dense_fv, "kept": kept if kept is not None else 1.0,
                   "analytic_kept": res.report["flops_kept"], "seq_len": self.seq, "priced_seq_len": self.price_len,
                   "pricing": self.price_desc, "analytic_kept_padded": analytic_kept(self.dense, res.model, self.seq)},
            params=res.report["params_after"], params_dense=res.report["params_before"],
            latency=lat, generation=gen,
            size=dict(size, dense_bytes=dense_bytes, compression_ratio=dense_bytes / max(size["bytes"], 1),
                      bits_per_weight=bits_per_weight(res.model, res.report["transforms"])),
            prune={"time_s": prune_time, "timings_s": timings, "widths": res.report["widths_after"],
                   "transforms": res.report["transforms"], "stages": res.report["stages"]}))
        return rec, computed


def run_serial(session: Session, runs: list[Run], write: Callable[[dict[str, Any]], None]) -> None:
    """Every run in this process, in order; scores computed once per score key."""
    from tqdm.auto import tqdm

    cache: dict[Any, tuple[Any, float]] = {}
    for run in tqdm(runs, desc="compare", unit="run", disable=not runs):
        tqdm.write(f"[run] {run.method} @ {run.budget:g}")
        rec, computed = session.run(run, cache.get(run.score_key) if run.score_key is not None else None)
        if computed is not None:
            cache[run.score_key] = computed
        if R.failed(rec):
            tqdm.write(f"[failed] {run.method} @ {run.budget:g}: {rec['failure']['summary']}")
        write(rec)


def compare(*, methods: str | None, model: str | None, budgets: list[float], options: dict[str, Any],
            calib_samples: int | None = None, eval_samples: int | None = None, seq_len: int | None = None,
            data_dir: str | None = None, device: str = "cpu", dtype: str | None = "auto", seed: int = 0, results_dir: str = "runs",
            task: str | None = None, lmeval_include: str | None = None, squad_split: str | None = None,
            num_beams: int | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
            latency_batch: int | list[int] | None = None, latency_warmup: int = 2, latency_repeats: int = 5,
            latency_min_time: float = 0.2, latency_threads: int | None = None, flops_seq_len: str | int = "padded",
            generation_batch: int | list[int] | None = None, generation_prompt: int = 32, generation_tokens: int = 16,
            eval_device_map: str | None = None, eval_max_memory: str | None = None, device_memory: str | None = None,
            offload: str = "auto", leaderboard: bool = True, command: list[str] | None = None, pm: Any = None,
            plugins: tuple[str, ...] = (), reference: str | None = None, executor: str = "serial",
            ray_address: str | None = None, gpus_per_run: float = 0, cpus_per_run: float = 1) -> list[dict[str, Any]]:
    """Run (or resume) every method x budget; print the tables; return the records.

    A run that fails (in any stage, its evaluation or its measurement) becomes a record with
    ``status: "failed"``, the stage and the error; the other runs go on; a re-run retries it.
    generation_batch / generation_prompt / generation_tokens: decoders' generation throughput (KV cache,
    :mod:`.generation`) at these batch sizes (None: :func:`.generation.default_generation_batches`, 0 or
    [] or generation_tokens=0: not measured), from a prompt of that many tokens, generating that many.
    eval_device_map / eval_max_memory: evaluate through accelerate's dispatch (:mod:`.dispatch`);
    device_memory / offload: the prune's placement as in ``harness prune`` (layer offload when the
    model does not fit: the evaluation is then dispatched, latency and generation not timed).
    latency_batch: batch size(s) of the latency measurement (None: :func:`default_latency_batches`; dense and pruned timed
    interleaved in the run's process, see ``measure.latency_record``); flops_seq_len: the
    sequence length the FLOPs budget is priced at: "padded" (--seq-len), "avg" (the
    calibration data's mean real length, as Kwon et al.'s code) or a number of tokens.
    pm: a plugin manager with extra plugin objects (serial executor only); plugins: extra
        plugins as "module:attribute" strings (every executor).
    reference: a results directory (e.g. the committed ``results``) whose records with the same
        keys are printed beside the ones computed now, differences beyond noise flagged.
    executor: "serial" (this process) or "ray" (:mod:`.ray_executor`: ``ray_address``,
        ``gpus_per_run``, ``cpus_per_run``); the records are the same but for timings, host and
        the ``executor`` field."""
    from .leaderboard import build, render_group

    sizes = (latency_batch,) if isinstance(latency_batch, int) else tuple(latency_batch or default_latency_batches(device))
    from .generation import default_generation_batches

    gen_sizes = ((generation_batch,) if isinstance(generation_batch, int) else
                 tuple(generation_batch) if generation_batch is not None else default_generation_batches(device))
    gen_sizes = () if gen_sizes == (0,) else gen_sizes  # 0: not measured
    settings = Settings(methods=methods, model=model, budgets=tuple(budgets), options=tuple(sorted(options.items())),
                        calib_samples=calib_samples, eval_samples=eval_samples, seq_len=seq_len, data_dir=data_dir,
                        device=device, dtype=dtype, seed=seed, task=task, lmeval_include=lmeval_include,
                        squad_split=squad_split,
                        num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        latency_batch=sizes, latency_warmup=latency_warmup, latency_repeats=latency_repeats,
                        latency_min_time=latency_min_time, latency_threads=latency_threads,
                        generation_batch=gen_sizes, generation_prompt=generation_prompt,
                        generation_tokens=generation_tokens, eval_device_map=eval_device_map,
                        eval_max_memory=eval_max_memory, device_memory=device_memory, offload=offload,
                        flops_seq_len=flops_seq_len, command=tuple(command) if command else None,
                        plugins=tuple(plugins))
    settings.check()
    if executor == "serial":
        work: Any = _SerialWork(settings, pm)
    elif executor == "ray":
        if pm is not None:
            raise ValueError("a plugin manager object cannot be sent to Ray workers: install the plugin (entry "
                             "point) or pass plugins=('module:attribute',)")
        from .ray_executor import RayWork

        work = RayWork(settings, address=ray_address, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run)
    else:
        raise ValueError(f"--executor {executor!r} is not 'serial' or 'ray'")

    info = work.describe()
    todo, done = [], []
    for run in info["runs"]:
        found = R.find_record(results_dir, info["task"], info["model"], run.key)
        (done.append(found) if found else todo.append(run))
    for rec in done:
        print(f"[skip] {rec['method']} @ {rec['budget']:g}: already recorded ({rec['record_key']})")
    dense_rec = R.find_record(results_dir, info["task"], info["model"], info["dense_key"])
    written: list[dict[str, Any]] = []

    def write(rec: dict[str, Any]) -> None:
        R.write_record(results_dir, rec)
        written.append(rec)

    work.execute(None if dense_rec else info["dense_key"], todo, write)
    if dense_rec is None:
        dense_rec = next(r for r in written if r["method"] == "dense")
    out = [dense_rec] + done + [r for r in written if r is not dense_rec]
    print(render_group(out))
    if reference and Path(reference).resolve() != Path(results_dir).resolve() and (Path(reference) / R.RUNS).is_dir():
        from .reproduce import against_reference

        table, flagged = against_reference(out, reference)
        if table:
            print("\n" + table)
            if flagged:
                print(f"\n{flagged} figure(s) differ from the committed ones beyond the noise tolerance: see above")
    if leaderboard:
        path = build(results_dir)
        print(f"\nleaderboard: {path}")
    failures = [r for r in out if R.failed(r)]
    if failures:
        print(f"\n{len(failures)} run(s) failed (recorded under {results_dir}/{R.RUNS}/; a re-run retries them):")
        for r in failures:
            print(f"  {r['method']} @ {r['budget']:g}: {r['failure']['summary']}")
    return out


class _SerialWork:
    """The in-process executor: one Session, runs in order."""

    def __init__(self, settings: Settings, pm: Any) -> None:
        self.session = Session(settings, pm)

    def describe(self) -> dict[str, Any]:
        return self.session.describe()

    def execute(self, dense_key: str | None, runs: list[Run], write: Callable[[dict[str, Any]], None]) -> None:
        if dense_key is not None:
            write(self.session.dense_record())
        run_serial(self.session, runs, write)
