"""Recomputed figures beside committed ones.

``harness compare`` writes a user's runs under their own results directory (default ``runs/``),
so a fresh clone computes everything instead of replaying ``results/``. When a reference
directory (default: the committed ``results/``) holds a record with the same key -- same model
weights, task data, settings, calibration, method, options, budget and seed -- the main metric,
FLOPs kept and parameters are printed side by side and any difference beyond the tolerance is
flagged. Timings are never compared (they depend on the machine and its load).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import records as R

#: Relative difference of a metric treated as run-to-run noise. Measured: the main job recomputed
#: from a fresh clone (CPU, same torch) reproduced the committed figures within 2e-6 relative (the
#: largest: magnitude at 60 %, perplexity 460956 vs 460955); other CPUs / BLAS builds change the
#: float summation order, hence the wider allowance.
TOLERANCE = 1e-3


def _close(a: Any, b: Any, tol: float) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= tol * max(abs(a), abs(b), 1e-12)
    return a == b


def against_reference(recs: list[dict[str, Any]], reference: str | Path,
                      tolerance: float = TOLERANCE) -> tuple[str | None, int]:
    """(markdown table of recomputed vs reference figures or None when nothing matches, number flagged)."""
    from tabulate import tabulate

    rows, flagged = [], 0
    for rec in recs:
        if R.failed(rec):
            continue
        ref = R.find_record(reference, rec["task"]["name"], rec["model"]["spec"], rec["record_key"])
        if ref is None:
            continue
        main = rec["main_metric"]
        pairs = [(rec["metrics"].get(main), ref["metrics"].get(main)), (rec["flops"].get("kept"), ref["flops"].get("kept")),
                 (rec.get("params"), ref.get("params"))]
        ok = all(_close(a, b, tolerance) for a, b in pairs)
        flagged += not ok
        budget = "dense" if rec["method"] == "dense" else f"{rec['budget']:g}"
        rows.append([rec["method"], budget, main, f"{pairs[0][0]:.6g}" if pairs[0][0] is not None else "-",
                     f"{pairs[0][1]:.6g}" if pairs[0][1] is not None else "-",
                     f"{pairs[1][0]:.4f} / {pairs[1][1]:.4f}", f"{pairs[2][0]} / {pairs[2][1]}",
                     "same" if ok else "DIFFERENT"])
    if not rows:
        return None, 0
    table = tabulate(rows, headers=["method", "budget", "metric", "now", "committed", "FLOPs kept now / committed",
                                    "params now / committed", f"within {tolerance:g} (relative)"],
                     tablefmt="github", disable_numparse=True)
    return f"Recomputed here vs the records in {reference}/ (same key: model, data, settings, calibration, " \
           f"method, options, budget, seed):\n\n{table}", flagged
