"""STAT vs magnitude pruning: quality at several FLOPs budgets (one-shot, no retraining).

Decoder (default): SmolLM2-135M, calibration = windows of the WikiText-2 *valid* tokens
file, evaluation = WikiText-2 raw *test* perplexity (``tshrink_harness.tasks.wikitext``,
SparseGPT/Wanda protocol, the first ``--eval-windows`` windows of ``--seq-len`` tokens).
Every method sees the same calibration batches; every run starts from the same dense
model. ``--mlp-only 0.8`` adds the issue's reference setting: keep 80 % of the MLP neurons
of every layer and all attention (uniform widths: ``stat-mlp`` with
``stat_allocation=uniform``), next to ``stat-mlp`` with global allocation at the same FLOPs
and magnitude pruning of the same neurons (no correction).

    python benchmarks/stat_quality.py                                  # SmolLM2, 0.6/0.5/0.4 + MLP 80 %
    python benchmarks/stat_quality.py --budgets 0.5 --methods stat --opt stat_sequential=false

Encoder (GLUE, a fine-tuned MiniLM): ``--task sst2 --model <fine-tuned dir>`` evaluates
dev accuracy / Spearman through the harness's task registry (``harness finetune --task
sst2`` writes such a directory); calibration = ``--calib-samples`` random training examples
(the issue's reference: 512), e.g.

    python benchmarks/stat_quality.py --task stsb --model <dir> --calib-samples 512 --seq-len 128 \
        --methods stat,stat-uniform,magnitude --budgets 0.6,0.5,0.4

Writes ``results/benchmarks/stat_quality[-<task>].json`` (atomic) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _opts(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"--opt {p!r} is not name=value")
        out[key.strip()] = value.strip()
    return out


def mlp_only_budget(model: torch.nn.Module, seq_len: int, keep: float) -> float:
    """FLOPs fraction of keeping ``keep`` of the neurons of every layer and all heads."""
    from tshrink.arch.families import get_adapter
    from tshrink.cost import CostModel

    ad = get_adapter(model)
    cost = CostModel(ad, seq_len)
    widths = {"heads": ad.head_counts(), "neurons": [int(round(keep * n)) for n in ad.neuron_counts()]}
    return cost.fraction(widths)


def magnitude_mlp_only(model: torch.nn.Module, keep: float) -> None:
    """Reference without correction: the ``keep`` fraction of largest-norm neurons per layer."""
    from tshrink.arch.families import get_adapter
    from tshrink.surgery import apply_selection
    from tshrink.units import Selection
    from tshrink_plugins.magnitude.scores import neuron_scores

    ad = get_adapter(model)
    neurons = []
    for layer in range(ad.num_layers):
        s = neuron_scores(ad, layer)
        neurons.append(torch.sort(-s, stable=True).indices[: int(round(keep * s.numel()))].tolist())
    apply_selection(ad, Selection([list(range(n)) for n in ad.head_counts()], neurons))


def run_lm(args: argparse.Namespace) -> dict[str, Any]:
    from tshrink.calibration import lm_batches_from_text
    from tshrink.models import load_model
    from tshrink.pipeline import prune
    from tshrink_harness.tasks.wikitext import calibration_text, wikitext2_perplexity

    dense, tok = load_model(args.model)
    dense.eval()
    text = calibration_text(args.data_dir, split="valid")
    calib = lm_batches_from_text(tok, text, seq_len=args.seq_len, n_sequences=args.calib_samples,
                                 source="wikitext-2 valid tokens")

    def ppl(net: torch.nn.Module) -> float:
        return wikitext2_perplexity(net, tok, data_dir=args.data_dir, seq_len=args.seq_len,
                                    max_windows=args.eval_windows).ppl

    runs: list[tuple[str, str, float, dict[str, Any]]] = []  # (label, method, budget, options)
    for budget in args.budgets:
        for method in args.methods:
            runs.append((method, method, budget, args.options if method.startswith("stat") else {}))
    if args.mlp_only:
        b = mlp_only_budget(dense, args.seq_len, args.mlp_only)
        runs.append((f"stat-mlp uniform {args.mlp_only:.0%} neurons", "stat-mlp", b,
                     {**args.options, "stat_allocation": "uniform"}))
        runs.append(("stat-mlp global", "stat-mlp", b, args.options))
        runs.append((f"magnitude MLP-only {args.mlp_only:.0%} neurons", "magnitude-mlp", b, {}))
    records = [{"label": "dense", "budget": 1.0, "ppl": ppl(dense)}]
    print(f"dense ppl {records[0]['ppl']:.2f}", flush=True)
    for label, method, budget, options in runs:
        net = copy.deepcopy(dense)
        t = time.perf_counter()
        if method == "magnitude-mlp":
            magnitude_mlp_only(net, args.mlp_only)
            report: dict[str, Any] = {}
        else:
            report = prune(net, method, budget, calib=calib, seq_len=args.seq_len, options=options,
                           seed=args.seed).report
        elapsed = time.perf_counter() - t
        rec = {"label": label, "method": method, "budget": budget, "options": options, "ppl": ppl(net),
               "prune_time_s": elapsed, "flops_kept": report.get("flops_kept"),
               "widths": report.get("widths_after"), "timings_s": report.get("timings_s"),
               "warnings": [w for st in report.get("stages", {}).values() for w in st.get("warnings", [])]}
        records.append(rec)
        print(f"{label:40s} budget {budget:.3f}  ppl {rec['ppl']:10.2f}  prune {elapsed:6.1f} s", flush=True)
        del net
    return {"model": args.model, "calibration": calib.describe(), "eval": {"seq_len": args.seq_len,
            "windows": args.eval_windows, "text": "wikitext-2-raw test"}, "records": records}


def run_glue(args: argparse.Namespace) -> dict[str, Any]:
    """A fine-tuned encoder (``harness finetune`` output) on a GLUE dev set, through the
    harness's task registry; calibration = ``--calib-samples`` random training examples."""
    from tshrink.models import load_model
    from tshrink.pipeline import prune
    from tshrink_harness.tasks.registry import get_task

    task = get_task(args.task)
    model, tok = load_model(args.model, head=task.head)
    task.check_model(model.config, args.model)
    task.prepare(Path(args.data_dir), need_train=True)
    calib = task.calibration(tok, samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed, batch_size=32)

    def evaluate(net: torch.nn.Module) -> dict[str, float]:
        return task.evaluate(net, tok, device="cpu", limit=args.eval_limit, seq_len=args.seq_len,
                             batch_size=64).metrics

    records: list[dict[str, Any]] = [{"label": "dense", "budget": 1.0, "metrics": evaluate(model)}]
    print(records[0], flush=True)
    for budget in args.budgets:
        for method in args.methods:
            net = copy.deepcopy(model)
            t = time.perf_counter()
            rep = prune(net, method, budget, calib=calib, seq_len=args.seq_len,
                        options=args.options if method.startswith("stat") else {}, seed=args.seed).report
            records.append({"label": method, "budget": budget, "prune_time_s": time.perf_counter() - t,
                            "flops_kept": rep["flops_kept"], "widths": rep["widths_after"], "metrics": evaluate(net)})
            print({k: records[-1][k] for k in ("label", "budget", "metrics", "prune_time_s")}, flush=True)
    return {"model": args.model, "task": args.task, "task_info": task.info, "calibration": calib.describe(),
            "records": records}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default=None, help="GLUE task for a fine-tuned encoder (sst2, stsb, ...)")
    p.add_argument("--budgets", default="0.6,0.5,0.4")
    p.add_argument("--methods", default="stat,magnitude")
    p.add_argument("--mlp-only", type=float, default=0.8, help="kept neuron fraction of the MLP-only runs (0: none)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-limit", type=int, default=None, help="GLUE: first N dev examples (default all)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--opt", action="append", default=[], help="stat option name=value (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.options = _opts(args.opt)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tshrink.checkpoint import write_json_atomic

    result = run_glue(args) if args.task else run_lm(args)
    result["command"] = "python benchmarks/stat_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / (
        f"stat_quality-{args.task}.json" if args.task else "stat_quality.json")
    write_json_atomic(out, result)
    print(f"wrote {out}")
    summary = [{k: r.get(k) for k in ("label", "budget", "ppl", "metrics") if r.get(k) is not None}
               for r in result["records"]]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
