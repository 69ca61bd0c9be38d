"""Shared pieces of the harness commands: defaults, calibration sources, prune-to-directory."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class KindDefaults:
    """Defaults per model kind, sized so the README's main job takes minutes on 2 CPU cores."""

    seq_len: int
    calib_samples: int
    eval_samples: int


DEFAULTS = {
    "causal": KindDefaults(seq_len=256, calib_samples=32, eval_samples=16),
    "encoder": KindDefaults(seq_len=128, calib_samples=256, eval_samples=256),
}


def resolve_data_dir(given: str | None) -> Path | None:
    """The local data directory: ``--data-dir``, else ``$TSHRINK_DATA_DIR``, else None."""
    value = given or os.environ.get("TSHRINK_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {value!r} does not exist")
    return path


def model_kind(model: Any) -> str:
    from tshrink.arch.families import get_adapter

    return "causal" if get_adapter(model).causal else "encoder"


def text_source(part: str, data: Path | None) -> tuple[str, str]:
    """(name, text) for calibration ('calibration') or evaluation ('evaluation') of LMs:
    WikiText-2 (valid for calibration, test for evaluation) when the data directory has it,
    else the Python documentation that ships with every CPython."""
    if data is not None:
        name = "wiki.valid.tokens" if part == "calibration" else "wiki.test.tokens"
        file = data / "wikitext-2-tokens" / name
        if file.exists():
            return f"wikitext-2-tokens/{name}", file.read_text(encoding="utf-8")
    from tshrink.textdata import builtin_text

    return f"python-docs:{part}", builtin_text(part)


def build_calibration(tokenizer: Any, kind: str, *, samples: int, seq_len: int, data: Path | None,
                      part: str = "calibration") -> Any:
    """Unlabelled calibration (or evaluation) batches for a model kind."""
    from tshrink.calibration import batches_from_texts, lm_batches_from_text
    from tshrink.textdata import builtin_sentences

    if samples < 1:
        raise ValueError(f"--calib-samples/--eval-samples must be at least 1, got {samples}")
    if kind == "causal":
        name, text = text_source(part, data)
        return lm_batches_from_text(tokenizer, text, seq_len=seq_len, n_sequences=samples, source=name)
    sentences = builtin_sentences(part)[:samples]
    return batches_from_texts(tokenizer, sentences, seq_len=seq_len, source=f"python-docs:{part}")


def prune_to_dir(*, model: str, method: str, budget: float, output: str, options: dict[str, Any],
                 calib_samples: int | None, seq_len: int | None, data_dir: str | None, device: str,
                 seed: int) -> dict[str, Any]:
    """Load, calibrate, prune, count FLOPs (fvcore), save checkpoint + ``report.json``."""
    from tshrink.checkpoint import save_pruned, write_json_atomic
    from tshrink.flops import measure_flops
    from tshrink.manager import get_plugin_manager
    from tshrink.models import load_model
    from tshrink.pipeline import prune
    from tshrink.registry import Registry

    pm = get_plugin_manager()
    spec = Registry(pm).method(method)  # fail on a bad name before loading anything
    data = resolve_data_dir(data_dir)
    net, tok = load_model(model)
    kind = model_kind(net)
    d = DEFAULTS[kind]
    seq = seq_len or d.seq_len
    calib = build_calibration(tok, kind, samples=calib_samples or d.calib_samples, seq_len=seq, data=data)
    fv_before = measure_flops(net, seq)["total"]
    t = time.perf_counter()
    result = prune(net, spec, budget, calib=calib, seq_len=seq, options=options, pm=pm, device=device, seed=seed)
    report = dict(result.report, model=model, wall_time_s=time.perf_counter() - t)
    report["fvcore_flops_before"] = fv_before
    report["fvcore_flops_after"] = measure_flops(net, seq)["total"]
    report["data_dir"] = str(data) if data else None
    save_pruned(net.to("cpu"), output, tokenizer=tok, info={"report": report}, compressed=result.compressed)
    write_json_atomic(Path(output) / "report.json", report)
    return report
