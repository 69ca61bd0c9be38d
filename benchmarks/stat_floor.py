"""Does STAT's per-layer width floor (``stat_min_width``) help? SmolLM2-135M at a FLOPs budget.

Prunes the packaged SmolLM2-135M with STAT once per floor, same calibration (WikiText-2
valid windows), and reports WikiText-2 test perplexity on the first ``--eval-windows``
windows, the narrowest layer kept and the widths. Writes results/benchmarks/stat_floor.json.

    OMP_NUM_THREADS=2 python benchmarks/stat_floor.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from tshrink.calibration import CalibrationData
from tshrink.models import load_model
from tshrink.pipeline import prune
from tshrink_harness.tasks.wikitext import calibration_text, calibration_windows, wikitext2_perplexity

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--flops", type=float, default=0.6)
    p.add_argument("--floors", default="0,0.5")
    p.add_argument("--calib", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "stat_floor.json"))
    a = p.parse_args()
    dense, tok = load_model("smollm2", head="causal-lm")
    ids = calibration_windows(tok, calibration_text(a.data_dir), n_samples=a.calib, seq_len=a.seq_len, seed=0)
    calib = CalibrationData([{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()}
                             for w in ids.split(4)], source=f"WikiText-2 valid, {a.calib} x {a.seq_len} tokens")
    ppl = lambda m: wikitext2_perplexity(m, tok, data_dir=a.data_dir, seq_len=a.seq_len,  # noqa: E731
                                         max_windows=a.eval_windows).as_dict()
    rows = [{"floor": None, "perplexity": ppl(dense)}]
    print(f"dense: {rows[0]['perplexity']}", flush=True)
    for floor in map(float, a.floors.split(",")):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        res = prune(model, "stat", a.flops, calib=calib, options={"stat_min_width": floor}, seed=0)
        widths = res.report["widths_after"]
        row = {"floor": floor, "flops_kept": res.report["flops_kept"], "prune_s": time.perf_counter() - t,
               "min_neurons": min(widths["neurons"]), "min_heads": min(widths["heads"]), "widths": widths,
               "perplexity": ppl(model)}
        rows.append(row)
        print(f"floor {floor}: min neurons {row['min_neurons']}, min heads {row['min_heads']}, "
              f"ppl {row['perplexity']}", flush=True)
        Path(a.out).write_text(json.dumps({"command": "python benchmarks/stat_floor.py " + " ".join(sys.argv[1:]),
                                           "model": "smollm2", "budget": a.flops, "calibration": calib.describe(),
                                           "eval": f"WikiText-2 test, first {a.eval_windows} windows of {a.seq_len}",
                                           "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
