"""Quantize / binarize / sparsify a model's Linear weights in place, pack them, restore them.

Every stage replaces the weights in scope (:mod:`.scope`) by their quantized values (the
model keeps running in float: simulated quantization) and returns the packed form
(:mod:`.packing`) plus report figures. ``restore`` rebuilds exactly those values from the
packed tensors. Optional recovery training runs on the calibration batches:

* ``kmeans`` / ``binarize``: the codebooks are trained, assignments fixed (the gradient of a
  centroid is the sum of its cluster's weight gradients, ``kmeans.codebook_gradient``);
* ``bs-flex``: latent weights and centroids are trained, weights move between the two
  clusters (``binarize.BSFlex``);
* ``imp``: the kept weights are fine-tuned between pruning steps (pruned ones stay zero).

The recovery loss is the model's own loss on labelled batches (``model(**batch).loss``), or,
for unlabelled batches, the mean squared error of the last hidden states against those of
the model before this stage (distillation); ``quant_loss`` picks (``auto``: labels when
every batch has them). Training uses Adam on the stage's own parameters only, with the model
in eval mode (no dropout), cycling through the batches.
"""
from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tshrink.calibration import CalibrationData, model_inputs, to_device
from tshrink.progress import Track, untracked
from tshrink.units import TransformResult
from tshrink_plugins.quant.binarize import BSFlex, binarize_fixed
from tshrink_plugins.quant.kmeans import KMeansResult, codebook_gradient, kmeans_quantize
from tshrink_plugins.quant.packing import FORMATS, HEADER_KEYS, pack, packed_format, unpack
from tshrink_plugins.quant.scope import scope_linears
from tshrink_plugins.quant.unstructured import IMPConfig, imp_schedule, iterative_magnitude_prune

FORMAT = "tshrink-quant/1"
LOSSES = ("auto", "labels", "distill")


# ------------------------------------------------------------------ recovery objective


class Objective:
    """Recovery loss on the calibration batches, batch ``step % n`` at step ``step``.

    Build it BEFORE changing the weights: for ``distill`` it records the current model's
    last hidden states as the targets.
    """

    def __init__(self, model: nn.Module, calib: CalibrationData | None, loss: str, steps: int, stage: str) -> None:
        if loss not in LOSSES:
            raise ValueError(f"quant_loss must be one of {LOSSES}, got {loss!r}")
        if calib is None:
            raise ValueError(f"transform stage {stage!r}: {steps} recovery steps need calibration batches "
                             "(pass calib=...), or set the steps option to 0")
        self.model = model
        self.kind = ("labels" if calib.has_labels else "distill") if loss == "auto" else loss
        if self.kind == "labels" and not calib.has_labels:
            raise ValueError(f"transform stage {stage!r}: quant_loss='labels' needs calibration batches with "
                             f"'labels'; the batches from {calib.source!r} have none (use quant_loss='distill')")
        if self.kind == "distill" and getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"transform stage {stage!r}: distillation needs decoder inputs; give an "
                             "encoder-decoder labelled batches (quant_loss='labels')")
        device = next(model.parameters()).device
        self.batches = [to_device(b, device) for b in calib.batches[:max(1, steps)]]
        self.targets: list[Tensor] = []
        if self.kind == "distill":
            with torch.no_grad():
                self.targets = [self._features(b) for b in self.batches]

    def _features(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.model(**model_inputs(batch), output_hidden_states=True)
        last = getattr(out, "last_hidden_state", None)
        return (last if last is not None else out.hidden_states[-1]).float()  # (batch, seq, hidden)

    def __call__(self, step: int) -> Tensor:
        i = step % len(self.batches)
        batch = self.batches[i]
        if self.kind == "labels":
            loss = self.model(**model_inputs(batch, labels=True)).loss
            if loss is None:
                raise ValueError(f"{type(self.model).__name__} returns no loss for labelled batches; "
                                 "use quant_loss='distill'")
            return loss
        err = ((self._features(batch) - self.targets[i]) ** 2).mean(dim=-1)  # (batch, seq)
        mask = batch["attention_mask"].to(err.dtype)
        return (err * mask).sum() / mask.sum()

    @torch.no_grad()
    def mean(self) -> float:
        """Mean loss over the batches (current weights)."""
        return sum(float(self(i)) for i in range(len(self.batches))) / len(self.batches)


def train(model: nn.Module, weights: list[Tensor], objective: Objective, steps: int,
          update: Callable[[list[Tensor]], None], track: Track = untracked) -> dict[str, Any]:
    """``steps`` times: loss -> dL/dW for ``weights`` -> ``update(grads)`` (steps the stage's
    parameters and writes the new weights). Only ``weights`` require grad meanwhile."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    before = objective.mean()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for step in track(range(steps), desc="recovery steps"):
                grads = torch.autograd.grad(objective(step), weights)
                update(list(grads))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {"steps": steps, "loss": objective.kind, "batches": len(objective.batches),
            "loss_before": before, "loss_after": objective.mean()}


# ------------------------------------------------------------------ grouping helpers


def _grouping(granularity: str, group_size: int) -> tuple[str, int | None]:
    if granularity == "group":
        if group_size < 1:
            raise ValueError("quant_granularity='group' needs quant_group_size >= 1")
        return granularity, group_size
    if group_size:
        raise ValueError(f"quant_group_size={group_size} is only used with quant_granularity='group', "
                         f"got {granularity!r}")
    return granularity, None


def _as_rows(W: Tensor, granularity: str) -> Tensor:
    """The 2-D view the binarizers group by rows: ``(1, numel)`` for one codebook per layer."""
    return W.reshape(1, -1) if granularity == "layer" else W


def _binarize(W: Tensor, granularity: str, group_size: int | None) -> KMeansResult:
    r = binarize_fixed(_as_rows(W, granularity), group_size)
    return KMeansResult(r.codebook, r.indices.reshape(W.shape), r.iterations, r.converged)


# ------------------------------------------------------------------ packing and reports


def _write(W: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        W.copy_(value.reshape(W.shape))


def _result(stage: str, model: nn.Module, named: dict[str, KMeansResult | Tensor], originals: dict[str, Tensor],
            scope: str, report: dict[str, Any]) -> TransformResult:
    """Pack every result, check the model holds exactly the unpacked weights, build the report."""
    tensors: dict[str, Tensor] = {}
    formats: dict[str, str] = {}
    payload = header = n = float_bytes = 0
    err = ref = 0.0
    for name, r in named.items():
        packed = {k: v.detach().cpu().contiguous() for k, v in pack(r).items()}
        formats[name] = packed_format(packed)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        W = model.get_parameter(name)
        if not torch.equal(unpack(packed).to(W.device, W.dtype), W.detach()):
            raise RuntimeError(f"stage {stage!r}: the model's {name} differs from its packed form")
        payload += sum(v.numel() * v.element_size() for k, v in packed.items() if k not in HEADER_KEYS)
        header += sum(v.numel() * v.element_size() for k, v in packed.items() if k in HEADER_KEYS)
        n += W.numel()
        float_bytes += W.numel() * originals[name].element_size()
        err += float(((W.detach().double() - originals[name].double()) ** 2).sum())
        ref += float((originals[name].double() ** 2).sum())
    meta = {"format": FORMAT, "stage": stage, "scope": scope, "weights": list(named), "formats": formats}
    report = {
        "scope": scope,
        "weights": len(named),
        "quantized_params": n,
        "bits_per_weight": 8 * payload / n,  # payload only: codebooks/scales/values + packed bits
        "packed_bytes": payload + header,  # what the stage adds to compressed.safetensors (+ its header)
        "float_bytes": float_bytes,  # the same weights in their float dtype
        "ratio": float_bytes / (payload + header),
        "relative_weight_error": (err / ref) ** 0.5 if ref else 0.0,  # ||W_q - W||_F / ||W||_F over the scope
        **report,
    }
    return TransformResult(tensors=tensors, meta=meta, report=report)


def _prepare(model: nn.Module, options: dict[str, Any], calib: CalibrationData | None, steps_key: str,
             stage: str) -> tuple[str, int, list[tuple[str, nn.Linear]], Objective | None, dict[str, Tensor]]:
    """What every stage starts from: scope, training steps (checked), the Linears in scope,
    the recovery objective (None without steps) and copies of the original weights."""
    scope, steps = options["quant_scope"], options[steps_key]
    if steps < 0:
        raise ValueError(f"{steps_key} must be >= 0, got {steps}")
    linears = scope_linears(model, scope)
    objective = Objective(model, calib, options["quant_loss"], steps, stage) if steps else None
    originals = {name: lin.weight.detach().clone() for name, lin in linears}
    return scope, steps, linears, objective, originals


# ------------------------------------------------------------------ stages


def kmeans_stage(model: nn.Module, options: dict[str, Any], calib: CalibrationData | None,
                 *, stage: str = "kmeans", track: Track = untracked) -> TransformResult:
    """k-means weight sharing (``stage="kmeans"``) or the exact fixed-centroid 1-bit
    binarization (``stage="binarize"``); optional centroid retraining, assignments fixed."""
    t = time.perf_counter()
    granularity, group_size = _grouping(options["quant_granularity"], options["quant_group_size"])
    scope, steps, linears, objective, originals = _prepare(model, options, calib, "quant_retrain_steps", stage)
    results: dict[str, KMeansResult] = {}
    for name, lin in track(linears, desc="weight matrices"):
        W = lin.weight.detach()
        if stage == "binarize":
            results[name] = _binarize(W, granularity, group_size)
        else:
            results[name] = kmeans_quantize(W, options["quant_bits"], granularity=granularity, group_size=group_size,
                                             init=options["quant_init"], iters=options["quant_iters"])
        _write(lin.weight, results[name].dequantize())
    quant_s = time.perf_counter() - t
    report: dict[str, Any] = {"bits": results[next(iter(results))].bits, "granularity": granularity,
                              "group_size": group_size, "quantize_s": quant_s}
    if stage == "kmeans":
        report["lloyd_converged"] = sum(r.converged for r in results.values())
    if objective is not None:
        codebooks = [r.codebook.detach().clone().requires_grad_(True) for r in results.values()]
        opt = torch.optim.Adam(codebooks, lr=options["quant_lr"])
        weights = [lin.weight for _, lin in linears]

        def update(grads: list[Tensor]) -> None:
            for cb, r, g in zip(codebooks, results.values(), grads):
                cb.grad = codebook_gradient(cb.detach(), r.indices, g)  # (G, K)
            opt.step()
            for cb, r, w in zip(codebooks, results.values(), weights):
                _write(w, KMeansResult(cb.detach(), r.indices).dequantize())

        report["recovery"] = train(model, weights, objective, steps, update, track)
        results = {n: KMeansResult(cb.detach().clone(), r.indices) for cb, (n, r) in zip(codebooks, results.items())}
    report["time_s"] = time.perf_counter() - t
    return _result(stage, model, results, originals, scope, report)


def bsflex_stage(model: nn.Module, options: dict[str, Any], calib: CalibrationData | None, *,
                 track: Track = untracked) -> TransformResult:
    """Flexible binarization: one-shot optimal 1-bit split, then ``quant_flex_steps`` of
    recovery training in which weights may cross between the two clusters."""
    t = time.perf_counter()
    granularity, group_size = _grouping(options["quant_granularity"], options["quant_group_size"])
    scope, steps, linears, objective, originals = _prepare(model, options, calib, "quant_flex_steps", "bs-flex")
    flex = {name: BSFlex(_as_rows(lin.weight.detach(), granularity), group_size) for name, lin in linears}
    start = {name: f.assignments() for name, f in flex.items()}
    for (name, lin), f in zip(linears, flex.values()):
        _write(lin.weight, f.result().dequantize())
    report: dict[str, Any] = {"bits": 1, "granularity": granularity, "group_size": group_size,
                              "quantize_s": time.perf_counter() - t}
    if objective is not None:
        params = [p for f in flex.values() for p in f.parameters()]
        opt = torch.optim.Adam(params, lr=options["quant_lr"])
        weights = [lin.weight for _, lin in linears]

        def update(grads: list[Tensor]) -> None:
            opt.zero_grad()
            for f, g in zip(flex.values(), grads):
                f().backward(g.reshape(f.latent.shape))  # STE to latent, scatter-add to centroids
            opt.step()
            for f, w in zip(flex.values(), weights):
                _write(w, f.result().dequantize())

        report["recovery"] = train(model, weights, objective, steps, update, track)
        moved = sum(int((f.assignments() != start[n]).sum()) for n, f in flex.items())
        report["moved_fraction"] = moved / sum(f.latent.numel() for f in flex.values())
    results = {}
    for name, lin in linears:
        r = flex[name].result()
        results[name] = KMeansResult(r.codebook, r.indices.reshape(lin.weight.shape))
    report["time_s"] = time.perf_counter() - t
    return _result("bs-flex", model, results, originals, scope, report)


def imp_stage(model: nn.Module, options: dict[str, Any], calib: CalibrationData | None, *,
              track: Track = untracked) -> TransformResult:
    """Iterative magnitude pruning along ``quant_imp_schedule``, with ``quant_imp_steps``
    of fine-tuning of the kept weights after every pruning step."""
    t = time.perf_counter()
    schedule = imp_schedule(options["quant_imp_schedule"])
    scope, steps, linears, objective, originals = _prepare(model, options, calib, "quant_imp_steps", "imp")
    params = {name: lin.weight for name, lin in linears}
    steps_log: list[dict[str, Any]] = []  # per pruning step: target, weights pruned, recovery figures

    def recover(step: int, sparsity: float, masks: dict[str, Tensor]) -> None:
        entry: dict[str, Any] = {"sparsity": sparsity, "pruned": sum(int((~m).sum()) for m in masks.values())}
        steps_log.append(entry)
        if objective is None:
            return
        weights = list(params.values())
        keep = [masks[n] for n in params]
        opt = torch.optim.Adam(weights, lr=options["quant_lr"])

        def update(grads: list[Tensor]) -> None:
            for w, g, m in zip(weights, grads, keep):
                w.grad = g * m
            opt.step()
            with torch.no_grad():
                for w, m in zip(weights, keep):
                    w.masked_fill_(~m, 0)
            opt.zero_grad(set_to_none=True)

        entry["recovery"] = train(model, weights, objective, steps, update, track)

    config = IMPConfig(schedule=options["quant_imp_schedule"], scope=options["quant_imp_ranking"])
    masks = iterative_magnitude_prune({n: w.detach() for n, w in params.items()}, config, recover)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    report: dict[str, Any] = {"schedule": schedule, "ranking": config.scope, "sparsity": 1 - kept / total,
                              "steps": steps_log}
    report["time_s"] = time.perf_counter() - t
    named = {n: w.detach() for n, w in params.items()}
    return _result("imp", model, named, originals, scope, report)


STAGES = {"kmeans": kmeans_stage, "binarize": lambda m, o, c, **kw: kmeans_stage(m, o, c, stage="binarize", **kw),
          "bs-flex": bsflex_stage, "imp": imp_stage}


def transform(stage: str, model: nn.Module, options: dict[str, Any],
              calib: CalibrationData | None = None, track: Track = untracked) -> TransformResult:
    """Run transform stage ``stage`` (one of :data:`STAGES`) on ``model`` in place; ``track``
    wraps the long loops (weight matrices, recovery steps) with progress bars."""
    if stage not in STAGES:
        raise ValueError(f"unknown quant stage {stage!r}; known: {sorted(STAGES)}")
    return STAGES[stage](model, options, calib, track=track)


# ------------------------------------------------------------------ restore and sizes


def restore(model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write the weights packed by a stage of this module back into ``model`` (exactly)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"compressed weights have format {meta.get('format')!r}, this plugin reads {FORMAT!r}")
    for name in meta["weights"]:
        fmt = meta["formats"][name]
        keys = FORMATS[fmt] + HEADER_KEYS
        missing = [k for k in keys if f"{name}.{k}" not in tensors]
        if missing:
            raise ValueError(f"compressed form of {name} lacks {missing}")
        W = unpack({k: tensors[f"{name}.{k}"] for k in keys})
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise ValueError(f"the model has no parameter {name!r} to restore") from None
        if param.shape != W.shape:
            raise ValueError(f"{name}: model shape {tuple(param.shape)}, packed shape {tuple(W.shape)}")
        _write(param, W.to(param.device, param.dtype))


def _tensor_bytes(file: Path) -> dict[str, int]:
    """Data bytes of every tensor of a safetensors file, read from its header."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _model_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path} has no model.safetensors")


def size_report(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Storage of a saved checkpoint's tensors, measured from its files.

    ``size_bytes``: the compact checkpoint = ``compressed.safetensors`` (whole file, header
    included) + data bytes of the tensors in ``model.safetensors`` that no quant stage
    replaced (embeddings, norms, biases, unquantized layers). ``float_bytes``: data bytes of
    all tensors in ``model.safetensors`` (the float model as saved, tied weights once).
    Config and tokenizer files are not counted.
    """
    from tshrink.checkpoint import COMPRESSED, read_manifest

    path = Path(checkpoint_dir)
    manifest = read_manifest(path) or {"transforms": []}
    replaced = {w for t in manifest["transforms"] if t.get("meta", {}).get("format") == FORMAT
                for w in t["meta"]["weights"]}
    tensors: dict[str, int] = {}
    for file in _model_files(path):
        tensors.update(_tensor_bytes(file))
    compressed = path / COMPRESSED
    compressed_bytes = compressed.stat().st_size if compressed.exists() else 0
    kept = sum(b for k, b in tensors.items() if k not in replaced)
    float_bytes = sum(tensors.values())
    size = compressed_bytes + kept
    return {"size_bytes": size, "compressed_file_bytes": compressed_bytes, "unquantized_bytes": kept,
            "float_bytes": float_bytes, "ratio_vs_float": float_bytes / size, "replaced_tensors": len(replaced)}


def compressed_size_bytes(checkpoint_dir: str | Path) -> int:
    """Size on disk of the compact checkpoint (see :func:`size_report`)."""
    return size_report(checkpoint_dir)["size_bytes"]
