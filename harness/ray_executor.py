"""``harness compare --executor ray``: the same comparison, fanned out as Ray tasks.

Tasks: ``describe`` (the record keys; it loads the model once in a worker), ``dense`` (the dense
row) and one ``run`` per method x budget, each with the resources a run needs (``--cpus-per-run``,
``--gpus-per-run``). Independent methods run in parallel. Runs whose recipes share a score stage
(and its options) wait for the first of them, which returns its scores; those are put in the
object store once and passed to the others, so no method scores twice.

Every worker builds its own :class:`~tshrink_harness.compare.Session` from the plain
:class:`~tshrink_harness.compare.Settings` (cached per worker process), so workers need no
shared file system for results: the driver writes every record, atomically, as tasks finish.
What every node must reach: the same tshrink (and plugin) versions installed, the ``--model``
directory and ``--data-dir`` at the same paths (or a hub id / the hub, when online).

Failures: a run that raises is a failure record (``Session.run`` never raises); a task whose
process dies is retried once by Ray (``max_retries=1``) and then recorded as failed (stage
``worker``). A re-run resumes exactly as the serial executor does.

Progress: an actor collects the step each run is at; the driver shows one bar per run and an
overall bar.
"""
from __future__ import annotations

import socket
from collections import OrderedDict
from typing import Any, Callable

from . import records as R
from .compare import STEPS, Run, Session, Settings

CONNECT_TIMEOUT_S = 10  # --address HOST:PORT must answer a TCP connection within this
RETRIES = 1  # a task whose worker process dies is started once more

_SESSION: list[Any] = []  # this worker's (settings, session): one comparison at a time


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray, which is not installed: pip install 'tshrink[ray]' "
                         "(or pip install ray)") from None
    return ray


def connect(ray: Any, address: str | None, *, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Join (or start) a Ray cluster; a description of where. ValueError when ``address`` does not answer."""
    if ray.is_initialized():
        return "existing"
    if address in (None, ""):
        ray.init(include_dashboard=False, log_to_driver=True)
        return "local"
    if address != "auto":
        hostport = address.split("://", 1)[-1]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--address {address!r} is not 'auto' or HOST:PORT (e.g. 10.0.0.1:6379)")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as err:
            raise ValueError(f"--address {address!r}: no Ray cluster answered within {timeout:g} s ({err}); start "
                             f"one with `ray start --head` on that machine or check the address") from None
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as err:
        raise ValueError(f"--address {address!r}: {err}") from None
    return address


def check_resources(ray: Any, *, gpus_per_run: float, cpus_per_run: float, device: str) -> None:
    """ValueError when no node can host one run."""
    if cpus_per_run <= 0 or gpus_per_run < 0:
        raise ValueError(f"--cpus-per-run must be > 0 and --gpus-per-run >= 0, got {cpus_per_run} / {gpus_per_run}")
    if device.startswith("cuda") and gpus_per_run <= 0:
        raise ValueError("--device cuda with --executor ray needs --gpus-per-run (Ray gives each task its GPUs)")
    if gpus_per_run > 0 and not device.startswith("cuda"):
        raise ValueError(f"--gpus-per-run {gpus_per_run:g} needs --device cuda (the runs would not use the GPUs)")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for name, want, flag in (("GPU", gpus_per_run, "--gpus-per-run"), ("CPU", cpus_per_run, "--cpus-per-run")):
        most = max((n.get(name, 0) for n in nodes), default=0)
        if want > most:
            raise ValueError(f"{flag} {want:g}: no node of the Ray cluster has that many {name}s "
                             f"(most on one node: {most:g}); lower it or add a bigger node")


# ---- what runs in the workers ------------------------------------------------------------------
def _session(settings: Settings, executor: dict[str, Any]) -> Session:
    import gc

    import torch

    if not _SESSION or _SESSION[0] != settings:
        _SESSION.clear()
        gc.collect()
        torch.set_num_threads(max(1, int(executor["cpus_per_run"])))
        info = dict(executor, node=socket.gethostname())
        _SESSION.extend([settings, Session(settings, executor=info)])
    return _SESSION[1]


def _describe(settings: Settings, executor: dict[str, Any]) -> dict[str, Any]:
    return _session(settings, executor).describe()


def _dense(settings: Settings, executor: dict[str, Any]) -> dict[str, Any]:
    return _session(settings, executor).dense_record()


def _run(settings: Settings, executor: dict[str, Any], run: Run, scores: Any,
         progress: Any) -> tuple[dict[str, Any], Any]:
    session = _session(settings, executor)
    if run.key not in {r.key for r in session.runs()}:  # another model / data / version on this node
        err = RuntimeError(f"node {socket.gethostname()} computes other record keys for {run.method} @ "
                           f"{run.budget:g}: its model, data or tshrink version differ from the driver's first worker")
        return R.jsonable(dict(run.head, status="failed", failure=R.failure(err, "worker"), metrics={})), None
    return session.run(run, scores, progress=False, step=lambda name: progress.step.remote(run.key, name))


class _Progress:
    """Actor: the step each run is at (the driver polls it)."""

    def __init__(self) -> None:
        self.steps: dict[str, str] = {}

    def step(self, key: str, name: str) -> None:
        self.steps[key] = name

    def snapshot(self) -> dict[str, str]:
        return dict(self.steps)


# ---- the driver ------------------------------------------------------------------------------------
class RayWork:
    """The Ray executor behind ``compare(executor="ray")``: checks, then tasks."""

    def __init__(self, settings: Settings, *, address: str | None, gpus_per_run: float, cpus_per_run: float) -> None:
        self.ray = ray = import_ray()
        self.settings = settings
        import dataclasses

        import torch

        # every input check, here, before any task; the driver itself may have no GPU
        local = settings if torch.cuda.is_available() or not settings.device.startswith("cuda") else \
            dataclasses.replace(settings, device="cpu", dtype="auto")
        local.plan()
        where = connect(ray, address)
        check_resources(ray, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, device=settings.device)
        self.executor = {"kind": "ray", "address": where, "cpus_per_run": cpus_per_run, "gpus_per_run": gpus_per_run}
        opts = {"num_cpus": cpus_per_run, "num_gpus": gpus_per_run, "max_retries": RETRIES}
        self._describe = ray.remote(**opts)(_describe)
        self._dense = ray.remote(**opts)(_dense)
        self._run = ray.remote(**opts)(_run)

    def describe(self) -> dict[str, Any]:
        return self.ray.get(self._describe.remote(self.settings, self.executor))

    def execute(self, dense_key: str | None, runs: list[Run], write: Callable[[dict[str, Any]], None]) -> None:
        from tqdm.auto import tqdm

        ray = self.ray
        progress = ray.remote(num_cpus=0)(_Progress).remote()
        pending: dict[Any, Run | None] = {}
        if dense_key is not None:
            pending[self._dense.remote(self.settings, self.executor)] = None
        # runs sharing a score key wait for the first of them (it returns the scores)
        waiting: OrderedDict[Any, list[Run]] = OrderedDict()

        def launch(run: Run, scores: Any = None) -> None:
            pending[self._run.remote(self.settings, self.executor, run, scores, progress)] = run

        for run in runs:
            if run.score_key is None:
                launch(run)
            elif run.score_key in waiting:
                waiting[run.score_key].append(run)
            else:
                waiting[run.score_key] = []
                launch(run)
        overall = tqdm(total=len(pending) + sum(map(len, waiting.values())), desc="compare", unit="run", position=0)
        bars: dict[str, Any] = {}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                self._show(ray.get(progress.snapshot.remote()), pending, bars)
                for ref in ready:
                    run = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as err:  # the worker died twice, or the task could not start
                        if run is None:
                            raise RuntimeError(f"the dense evaluation failed on the Ray cluster: {err}") from err
                        result = (R.jsonable(dict(run.head, status="failed", failure=R.failure(err, "worker"),
                                                  metrics={})), None)
                    if run is None:
                        write(result)
                    else:
                        rec, computed = result
                        tqdm.write(f"[{'failed' if R.failed(rec) else 'done'}] {run.method} @ {run.budget:g}"
                                   + (f": {rec['failure']['summary']}" if R.failed(rec) else ""))
                        write(rec)
                        bar = bars.pop(run.key, None)
                        if bar is not None:
                            bar.close()
                        others = waiting.get(run.score_key) if run.score_key is not None else None
                        if others:
                            if computed is not None:  # everyone else of this score key gets the scores
                                shared = ray.put(computed)
                                for other in others:
                                    launch(other, shared)
                                others.clear()
                            else:  # no scores (it failed): the next one computes them
                                launch(others.pop(0))
                    overall.update(1)
        finally:
            for bar in bars.values():
                bar.close()
            overall.close()
            ray.kill(progress)

    @staticmethod
    def _show(steps: dict[str, str], pending: dict[Any, Run | None], bars: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        active = {run.key: run for run in pending.values() if run is not None}
        for key, name in steps.items():
            if key not in active:
                continue
            bar = bars.get(key)
            if bar is None:
                run = active[key]
                bar = bars[key] = tqdm(total=len(STEPS), desc=f"{run.method} @ {run.budget:g}", unit="step",
                                       position=len(bars) + 1, leave=False)
            bar.set_postfix_str(name, refresh=False)
            bar.n = STEPS.index(name)
            bar.refresh()
