"""Shared pieces of the harness commands: the pre-flight plan (every check before any work),
and ``harness prune``'s prune-to-directory."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import resolve_data_dir  # noqa: F401  (the one resolver; re-exported for callers)


@dataclass
class Plan:
    """Everything validated before a model is loaded."""

    pm: Any
    registry: Any
    specs: list[Any]  # MethodSpec per requested method
    options: dict[str, dict[str, Any]]  # method name -> its (raw) options
    task: Any  # a prepared tshrink_harness.tasks.registry.Task
    model: str
    config: Any
    data_dir: Path | None
    device: str  # resolved: cpu, cuda:N
    seq_len: int
    calib_samples: int
    eval_samples: int | None
    needs_calibration: bool
    dtype: Any = None  # torch dtype to load and run in (resolved from --dtype)
    dtype_note: str = ""


def split_methods(text: str | None, registry: Any) -> list[str]:
    if not text:
        names = [n for n in sorted(registry.methods) if registry.methods[n].compare_by_default]
        if not names:
            raise ValueError("no method is marked compare_by_default; pass --methods (see `harness plugins`)")
        return names
    # a recipe ("score=a,select=b") contains commas too: methods are split on ';' when one has '='
    parts = text.split(";") if "=" in text else text.split(",")
    names = [p.strip() for p in parts if p.strip()]
    if not names:
        raise ValueError(f"--methods {text!r} names no method")
    return names


def check_device(device: str) -> str:
    """The resolved device name (cpu, cuda:N) for --device cpu|cuda|cuda:N|auto; ValueError otherwise."""
    from tshrink.placement import resolve_device

    return str(resolve_device(device))


def make_plan(*, methods: str | None, model: str | None, task: str | None, options: dict[str, str],
              data_dir: str | None, device: str, seq_len: int | None, calib_samples: int | None,
              eval_samples: int | None, lmeval_include: str | None = None,
              squad_split: str | None = None, num_beams: int | None = None,
              max_new_tokens: int | None = None, pm: Any = None, dtype: str | None = "auto") -> Plan:
    """Resolve and check methods, options, device, data directory, model and task; read the
    task's data. Raises ValueError / FileNotFoundError with the reason; loads no model.

    ``num_beams`` / ``max_new_tokens``: decoding options of generation tasks (translation);
    None = the task's default, an error for a task they do not apply to."""
    from transformers import AutoConfig

    from tshrink.manager import get_plugin_manager
    from tshrink.models import resolve_model
    from tshrink.registry import Registry

    from .tasks.registry import config_kind, default_task, get_task

    pm = pm or get_plugin_manager()
    reg = Registry(pm)
    # plugins that failed to load or clash: one line each (once per plugin manager), the rest runs
    reg.warn_problems(emit=lambda text: print(f"harness: warning: {text}", file=sys.stderr))
    specs = [reg.method(n) for n in split_methods(methods, reg)]  # "did you mean" on unknown names
    known = {name for spec in specs for name in reg.options(spec)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"option(s) {unknown} belong to none of the methods {[s.name for s in specs]}; "
                         f"see `harness plugins --options`")
    per_method = {s.name: {k: v for k, v in options.items() if k in reg.options(s)} for s in specs}
    for spec in specs:
        reg.resolve_options(spec, per_method[spec.name])  # bad values fail now
    from tshrink.placement import DTYPE_CHOICES, resolve_dtype

    if (dtype or "auto").lower() not in DTYPE_CHOICES:  # before the device: one line for the first bad value
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    device = check_device(device)
    data = resolve_data_dir(data_dir)
    for name, value in (("--seq-len", seq_len), ("--calib-samples", calib_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if eval_samples is not None and eval_samples < 0:
        raise ValueError(f"--eval-samples must be >= 0 (0 = the whole split), got {eval_samples}")
    task_opts = {"lmeval_include": lmeval_include, "squad_split": squad_split, "num_beams": num_beams,
                 "max_new_tokens": max_new_tokens}
    if model is None:
        wanted = get_task(task, **task_opts).model_kind if task is not None else "causal"
        if wanted == "seq2seq":
            raise ValueError(f"task {task!r} needs an encoder-decoder (seq2seq) model and there is no built-in one: "
                             f"pass --model DIR (a local model directory, e.g. Helsinki-NLP/opus-mt-en-de)")
        model = "minilm" if wanted == "encoder" else "smollm2"
    where = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(where)
    except OSError as err:
        raise FileNotFoundError(f"cannot read the config of model {model!r}: {err}") from None
    kind = config_kind(config)
    if task is None:
        task = default_task(kind or "causal", data)
    t = get_task(task, **task_opts)
    t.check_model(config, model)
    check_architecture(specs, reg, config, model)
    needs = [reg.needs(s.recipe) for s in specs]
    labelled = [s.name for s, n in zip(specs, needs) if n["labels"]]
    if labelled and not t.labelled_calibration:
        raise ValueError(f"method(s) {labelled} need labelled calibration data, which task {t.name!r} does not "
                         f"provide; use a task with a training split (e.g. --task sst2, --task pydocs)")
    seq = seq_len or t.seq_len
    if t.model_kind == "causal" and seq < 2:
        raise ValueError(f"--seq-len {seq} leaves no next-token target in a window (each window of a causal LM "
                         f"predicts its last seq_len - 1 tokens); give at least 2")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq > max_pos:
        given = "--seq-len" if seq_len else f"task {t.name!r}'s default sequence length"
        raise ValueError(f"{given} {seq} is longer than model {model!r}'s context: its max_position_embeddings is "
                         f"{max_pos}; pass --seq-len {max_pos} or less")
    need_calib = any(n["calibration"] for n in needs)
    t.prepare(data, need_train=need_calib)
    evals = (eval_samples or None) if eval_samples is not None else t.eval_samples
    import torch

    run_dtype, dtype_note = resolve_dtype(dtype, torch.device(device), config)
    return Plan(pm, reg, specs, per_method, t, model, config, data, device, seq,
                calib_samples or t.calib_samples, evals, need_calib, run_dtype, dtype_note)


def check_architecture(specs: list[Any], registry: Any, config: Any, model: str) -> None:
    """ValueError when a structured method (score/select/refine/correct stages) is asked
    for a model type no architecture adapter supports (e.g. Marian); transform-only
    methods (quantization, unstructured sparsity) walk the modules and work on any."""
    from tshrink.arch.families import architecture_support, supported_model_types

    model_type = getattr(config, "model_type", None)
    structural = [s.name for s in specs if s.recipe.prunes]
    reason = architecture_support(config) if structural else None
    if reason is not None:
        only = sorted(n for n, m in registry.methods.items() if not m.recipe.prunes)
        raise ValueError(f"method(s) {structural} remove attention heads / MLP neurons and need an architecture "
                         f"adapter; model {model!r} ({model_type}) has none: {reason} (supported model types: "
                         f"{', '.join(supported_model_types())}). Methods that only transform weights work on it: "
                         f"{', '.join(only) or '(none installed)'}")


def build_calibration(plan: Plan, tokenizer: Any, *, seed: int, batch_size: int) -> Any:
    """The task's calibration batches for ``plan`` (None when no method needs any).

    When the data holds fewer examples / windows than ``--calib-samples`` asked for, says so on
    stderr and records both figures (``requested`` in the calibration description)."""
    import sys

    if not plan.needs_calibration:
        return None
    calib = plan.task.calibration(tokenizer, samples=plan.calib_samples, seq_len=plan.seq_len, seed=seed,
                                  batch_size=batch_size)
    if calib.n_examples < plan.calib_samples:
        calib.meta["requested"] = plan.calib_samples
        print(f"harness: warning: --calib-samples {plan.calib_samples} asks for more than task {plan.task.name!r} "
              f"provides at seq_len {plan.seq_len}: calibrating on {calib.n_examples} (recorded)",
              file=sys.stderr, flush=True)
    return calib


def flops_or_none(model: Any, seq_len: int) -> int | None:
    """fvcore FLOPs, None for an architecture without an adapter (transform-only recipes)."""
    from tshrink.flops import measure_flops

    try:
        return int(measure_flops(model, seq_len)["total"])
    except ValueError:
        return None


def prune_to_dir(*, model: str | None, method: str, budget: float, output: str, options: dict[str, Any],
                 calib_samples: int | None, seq_len: int | None, data_dir: str | None, device: str,
                 seed: int, task: str | None = None, batch_size: int = 8, overwrite: bool = False,
                 dtype: str | None = "auto", device_memory: str | None = None, offload: str = "auto") -> dict[str, Any]:
    """Load, calibrate on the task's data, prune, count FLOPs (fvcore), save checkpoint + ``report.json``.

    ``output`` is checked before anything is loaded (:func:`tshrink.outputs.check_output_dir`): it must be
    new, empty, or (with ``overwrite``) a checkpoint the toolkit wrote.
    ``dtype``: load and run in it (``auto``: the checkpoint's); the checkpoint is saved in it.
    ``device_memory`` (e.g. ``"8GiB"``): memory usable on the device (default: what is free);
    when the model does not fit, its layers stay on the host and move to the device one at a
    time (``offload``: ``auto`` | ``always`` | ``never``). Everything is checked from the
    config before any weights are loaded. Layer-wise stages keep per-layer state in the hidden
    sibling ``.OUTPUT.tshrink-resume`` (removed when the prune finishes): rerunning the same
    command after a kill continues from the last finished layer (:mod:`tshrink.resume`)."""
    from tshrink.checkpoint import MANIFEST, save_pruned
    from tshrink.models import load_model, resolve_model
    from tshrink.outputs import OutputError, check_output_dir
    from tshrink.pipeline import prune

    from .records import jsonable

    check_output_dir(output, markers=(MANIFEST,), overwrite=overwrite, what="--output")
    plan = make_plan(methods=method, model=model, task=task, options=options,
                     data_dir=data_dir, device=device, seq_len=seq_len, calib_samples=calib_samples, eval_samples=None,
                     dtype=dtype)
    spec, t = plan.specs[0], plan.task
    where = Path(resolve_model(plan.model))
    if where.is_dir() and where.resolve() == Path(output).expanduser().resolve():
        raise OutputError(f"--output {output!r} is the input model's directory; write the pruned model elsewhere")
    placement = plan_placement_for(plan, batch_size=batch_size, device_memory=device_memory, offload=offload)
    net, tok = load_model(plan.model, head=t.head, num_labels=t.num_labels, dtype=plan.dtype)
    calib = build_calibration(plan, tok, seed=seed, batch_size=batch_size)
    fv_before = flops_or_none(net, plan.seq_len)
    start = time.perf_counter()
    out = Path(output).expanduser().resolve()
    resume = out.parent / f".{out.name}.tshrink-resume"  # per-layer state: a rerun after a kill continues
    result = prune(net, spec, budget, calib=calib, seq_len=plan.seq_len, options=plan.options[spec.name],
                   pm=plan.pm, seed=seed, progress=True, placement=placement, resume=resume)
    report = jsonable(dict(result.report, model=plan.model, task=t.name, wall_time_s=time.perf_counter() - start,
                           dtype=str(plan.dtype).replace("torch.", ""), dtype_choice=plan.dtype_note))
    report["fvcore_flops_before"] = fv_before
    report["fvcore_flops_after"] = flops_or_none(net, plan.seq_len)
    report["data_dir"] = str(plan.data_dir) if plan.data_dir else None
    save_pruned(net.to("cpu"), output, tokenizer=tok, info={"report": report}, compressed=result.compressed,
                files={"report.json": report}, overwrite=overwrite)
    return report


def parse_pricing(value: Any) -> str | int:
    """``--flops-seq-len``: "padded", "avg" or a positive number of tokens; ValueError naming the value."""
    text = str(value).strip().lower()
    if text in ("padded", "avg"):
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--flops-seq-len {value!r} is not 'avg' (the calibration data's mean length), 'padded' "
                         f"(--seq-len) or a positive number of tokens")
    return n


def pricing_length(pricing: str | int, seq_len: int, calib: Any, make_calib: Any = None) -> tuple[int, str]:
    """(tokens, description) the FLOPs budget is priced at. "avg": the mean number of real
    (non-padding) tokens per calibration example, rounded (``make_calib()`` builds the
    calibration data when no method needed any)."""
    if pricing == "padded":
        return seq_len, f"padded ({seq_len})"
    if pricing == "avg":
        data = calib if calib is not None else make_calib()
        mean = data.n_tokens / data.n_examples
        return max(1, round(mean)), f"avg ({mean:.2f} real tokens per calibration example)"
    return int(pricing), f"{int(pricing)} tokens"


def analytic_kept(dense: Any, pruned: Any, seq_len: int) -> float | None:
    """Kept fraction of the transformer layers' MACs at ``seq_len`` (analytic cost model)."""
    from tshrink.arch.families import get_adapter
    from tshrink.cost import CostModel

    try:
        cost = CostModel(get_adapter(dense), seq_len)
        return cost.macs(get_adapter(pruned).widths()) / cost.macs()
    except ValueError:
        return None


def plan_placement_for(plan: Plan, *, batch_size: int, device_memory: str | None = None,
                       offload: str = "auto") -> Any:
    """Where the prune of ``plan`` runs (whole model on the device, or layer offload), from the
    model's config and the calibration size; ValueError before any weights are loaded."""
    import torch

    from tshrink.placement import PlacementError, model_shape, parse_bytes, plan_placement

    try:
        limit = parse_bytes(device_memory)
    except PlacementError as err:
        raise ValueError(f"--device-memory: {err}") from None
    try:
        shape = model_shape(plan.config, plan.dtype, head=plan.task.head)
    except Exception:  # noqa: BLE001 - no adapter (transform-only recipes) or no meta build: whole model on the device
        return None
    tokens = plan.calib_samples * plan.seq_len if plan.needs_calibration else 0
    batch_tokens = min(batch_size, max(plan.calib_samples, 1)) * plan.seq_len
    try:
        return plan_placement(shape, torch.device(plan.device), plan.dtype, calib_tokens=tokens,
                              batch_tokens=batch_tokens, limit=limit, offload=offload)
    except PlacementError as err:
        raise ValueError(str(err)) from None
