"""STAT's ``stat_sequential``: 'layer' vs 'sublayer' on a decoder and an encoder, same calibration.

'layer' fits each MLP's decomposition on activations that came through the dense attention of
its layer; 'sublayer' re-runs the layer after pruning its heads so the MLP sees the pruned
attention (one more pass per layer). This runs ``harness compare`` once per setting:

- SmolLM2-135M (packaged), WikiText-2 quick protocol (16 test windows of 256 tokens), 32 x 256
  calibration tokens from the validation file, budgets 0.8 / 0.6 / 0.5;
- a fine-tuned MiniLM (``--minilm DIR``, e.g. /work/ft/minilm-mrpc) on its GLUE task, 512
  calibration examples, budgets 0.6 / 0.5 / 0.4;

and writes ``results/benchmarks/stat_sequential.json`` (the main metric per setting and budget,
prune seconds, and the command). ``--collect RESULTS`` only tabulates records already computed
by those commands. Keep it short on a shared CPU: ``OMP_NUM_THREADS=1``, latency timed once.

    python benchmarks/stat_sequential.py --data-dir ../shared/data --minilm /work/ft/minilm-mrpc --task mrpc
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

QUICK = ["--reference", "none", "--no-leaderboard", "--latency-repeats", "1", "--latency-min-time", "0.05",
         "--latency-warmup", "0", "--gen-tokens", "0"]


def commands(data_dir: str, minilm: str | None, task: str, results: str) -> list[list[str]]:
    out = []
    for s in ("layer", "sublayer"):
        out.append(["compare", "--model", "smollm2", "--task", "wikitext2-quick", "--data-dir", data_dir,
                    "--methods", "stat", "--flops", "0.8,0.6,0.5", "--opt", f"stat_sequential={s}",
                    "--results", results, *QUICK])
    if minilm:
        for s in ("layer", "sublayer"):
            out.append(["compare", "--model", minilm, "--task", task, "--data-dir", data_dir, "--methods", "stat",
                        "--flops", "0.6,0.5,0.4", "--calib-samples", "512", "--opt", f"stat_sequential={s}",
                        "--results", results, *QUICK])
    return out


def collect(results: str) -> dict:
    from tshrink_harness.records import load_records

    rows = []
    for r in load_records(results):
        if r.get("status") == "failed":
            continue
        seq = "dense" if r["method"] == "dense" else r["options"].get("stat_sequential")
        rows.append({"model": r["model"]["spec"], "architecture": r["model"]["architecture"],
                     "task": r["task"]["name"], "metric": r["main_metric"], "sequential": seq,
                     "budget": r["budget"], "flops_kept": r["flops"]["kept"],
                     "value": r["metrics"][r["main_metric"]], "prune_s": r["prune"]["time_s"],
                     "calibration": (r.get("calibration") or {}).get("n_examples")})
    rows.sort(key=lambda x: (x["task"], x["sequential"] != "dense", x["sequential"], -x["budget"]))
    return {"rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--minilm", default=None, help="fine-tuned MiniLM directory (its GLUE task: --task)")
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--results", default="runs/stat-sequential")
    ap.add_argument("--collect", action="store_true", help="only tabulate the records under --results")
    ap.add_argument("--output", default="results/benchmarks/stat_sequential.json")
    args = ap.parse_args()
    cmds = commands(args.data_dir, args.minilm, args.task, args.results)
    if not args.collect:
        from tshrink_harness.cli import main as harness

        for argv in cmds:
            if harness(argv) != 0:
                print(f"failed: harness {' '.join(argv)}", file=sys.stderr)
                return 1
    out = collect(args.results) | {"commands": [["harness", *c] for c in cmds],
                                   "note": "one seed; CPU, 2 shared cores, OMP_NUM_THREADS=1"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    for row in out["rows"]:
        print(f"{row['task']:>16} {row['sequential']:>9} {row['budget']:<5g} {row['metric']}={row['value']:.4g} "
              f"prune {row['prune_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
