"""Run records: one JSON file per (model, task, method, budget, ...) under ``results/runs/``.

A record holds everything needed to reproduce and compare the run: model and data hashes,
method + recipe + resolved options, budget, seed, calibration description and hash, the
evaluation protocol, package versions, git revision, device. Files are written atomically
(``tshrink.checkpoint.write_json_atomic``), so an interrupted compare never leaves half a
record, and a re-run skips every record it finds.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

SCHEMA = "tshrink-run/1"
RUNS = "runs"
FLOPS_NOTE = ("FLOPs: fvcore, 1 multiply-add = 1 FLOP, backbone only (no embeddings / task head), one sequence "
              "of seq_len tokens, attention over the full seq x seq square; 'FLOPs kept' = pruned / dense")
SIZE_NOTE = ("size: bytes of the saved checkpoint's tensors (compressed.safetensors + the float tensors no "
             "quantization stage replaced, as tshrink_plugins.quant.apply.compressed_size_bytes counts them; "
             "the safetensors files' sizes when that plugin is absent); "
             "ratio = dense size / size; bits/weight: of the quantized weights as the transform reports it, "
             "else the bits of the weights' dtype")
PACKAGES = ("tshrink", "torch", "transformers", "fvcore", "pluggy", "datasets", "evaluate", "lm_eval")


def hash_tensors(model: Any) -> str:
    """sha256 (16 hex) over every parameter/buffer name, shape, dtype and byte."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def hash_calibration(calib: Any) -> str:
    h = hashlib.sha256()
    for b in calib.batches:
        for key in sorted(b):
            h.update(key.encode())
            h.update(b[key].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors / numpy values turned into numbers or lists, tuples into lists,
    and anything else unknown into its string form (records must be plain JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist"):  # torch / numpy
        return jsonable(obj.tolist())
    return str(obj)


def key_of(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_revision() -> dict[str, Any]:
    """{"commit": short hash or "unknown", "dirty": bool | None} of the working tree."""
    cwd = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=cwd, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=cwd, timeout=10)
        return {"commit": commit or "unknown", "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"type": device, "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    if str(device).startswith("cuda"):
        info["name"] = torch.cuda.get_device_name(device)
    return info


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "x"


def model_tag(spec: str) -> str:
    """A short readable name for a --model value (built-in name or directory basename)."""
    return slug(Path(spec.rstrip("/")).name or spec)


def record_path(results: str | Path, rec: dict[str, Any]) -> Path:
    budget = "dense" if rec["method"] == "dense" else f"{rec['budget']:g}"
    name = f"{slug(rec['method'])}@{budget}-{rec['record_key']}.json"
    return Path(results) / RUNS / slug(rec["task"]["name"]) / model_tag(rec["model"]["spec"]) / name


def find_record(results: str | Path, task: str, model: str, key: str) -> dict[str, Any] | None:
    """The finished record with ``key`` (a failed run's record is not: re-running retries it)."""
    folder = Path(results) / RUNS / slug(task) / model_tag(model)
    for file in sorted(folder.glob(f"*-{key}.json")):
        rec = json.loads(file.read_text())
        if not failed(rec):
            return rec
    return None


def failed(rec: dict[str, Any]) -> bool:
    return rec.get("status") == "failed"


def failure(err: BaseException, where: str) -> dict[str, Any]:
    """What a failed run's record says: the stage (``kind:name`` when the pipeline's StageError names
    it, else the harness step: prune / evaluate / measure), plugin, error type, message, traceback."""
    import traceback

    kind, name = getattr(err, "kind", None), getattr(err, "stage", None)
    stage = f"{kind}:{name}" if kind and name else where
    cause = err.__cause__ if kind and err.__cause__ is not None else err
    message = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
    return {"stage": stage, "plugin": getattr(err, "plugin", None), "package": getattr(err, "package", None),
            "error": type(cause).__name__, "message": str(err)[:4000],
            "summary": f"{stage}: {type(cause).__name__}: {message}",
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-8000:]}


def write_record(results: str | Path, rec: dict[str, Any]) -> Path:
    from tshrink.checkpoint import write_json_atomic

    path = record_path(results, rec)
    write_json_atomic(path, rec)
    return path


def load_records(results: str | Path) -> list[dict[str, Any]]:
    """Every record under ``results/runs`` (sorted by path; other JSON files are ignored)."""
    out = []
    for file in sorted((Path(results) / RUNS).rglob("*.json")):
        rec = json.loads(file.read_text())
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
            out.append(rec)
    return out


def speedup_flag(speedup: float | None, flops_kept: float | None, *, tolerance: float = 0.0) -> str | None:
    """``"noise"`` when a measured speed-up exceeds what the FLOPs allow (``1 / flops_kept``,
    times ``1 + tolerance``): removing FLOPs cannot make a forward faster than that, so the
    ratio reflects the machine, not the model. None when it is plausible or not checkable
    (no FLOPs count, nothing removed: transforms can speed up memory-bound passes)."""
    if speedup is None or flops_kept is None or not 0 < flops_kept < 1:
        return None
    return "noise" if speedup > (1.0 + tolerance) / flops_kept else None
