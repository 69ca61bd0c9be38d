"""How many gradient rows does the Fisher matrix of a decoder need? (SmolLM2-135M, WikiText-2)

Kwon et al.'s rearrangement optimises ``1/2 ||sum_{pruned} g||^2`` with one gradient row per
mini-batch. The old decoder default, 32 windows in batches of 8, gave 4 rows (rank <= 4 per
layer). This script collects PER-WINDOW mask gradients once and derives every setting from
them exactly: windows all have ``seq_len`` real tokens, so the gradient of a batch's mean loss
is the mean of its windows' gradients. Settings compared at one FLOPs budget:

    32 windows / batches of 8 (4 rows)  ·  32 windows per window (32 rows)  ·  64 windows per window

Each selection (search + rearrangement, no tuning) is scored by its Fisher loss per row on
32 HELD-OUT windows (never used for selection) and by WikiText-2 test perplexity of the
physically pruned model (first ``--eval-windows`` windows). Writes
``results/benchmarks/fisher_rows_smollm2.json``. Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/fisher_rows.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tshrink.arch.families import get_adapter
    from tshrink.calibration import CalibrationData
    from tshrink.checkpoint import write_json_atomic
    from tshrink.cost import CostModel
    from tshrink.models import load_model
    from tshrink.surgery import apply_selection
    from tshrink.units import Selection
    from tshrink_harness.tasks.registry import get_task
    from tshrink_plugins.fisher.collect import collect_mask_grads
    from tshrink_plugins.fisher.fisher_math import fisher_importance, fisher_loss_increase
    from tshrink_plugins.fisher.rearrange import rearrange_mask
    from tshrink_plugins.fisher.search import search_mask

    task = get_task("wikitext2")
    task.prepare(Path(args.data_dir), need_train=True)
    model, tok = load_model("smollm2", head=task.head)
    model.eval()
    calib = task.calibration(tok, samples=96, seq_len=args.seq_len, seed=args.seed, batch_size=8)
    start = time.perf_counter()
    adapter = get_adapter(model)
    heads, neurons = collect_mask_grads(adapter, calib, grad_batch_size=1)  # (96, units_l) per layer
    grad_s = time.perf_counter() - start
    cost = CostModel(adapter, args.seq_len)
    allowed = max(cost.budget_macs(args.budget) - sum(c.fixed for c in cost.layers), 0.0)
    held = slice(64, 96)

    def rows(grads, n, group):
        g = grads[:n]
        return g.reshape(n // group, group, -1).mean(1) if group > 1 else g

    settings = {"32 windows, batches of 8": (32, 8), "32 windows, per window": (32, 1),
                "64 windows, per window": (64, 1)}
    dense_ppl = task.evaluate(model, tok, device="cpu", limit=args.eval_windows, seq_len=args.seq_len,
                              batch_size=4).metrics["perplexity"]
    out = {"model": "smollm2", "task": "wikitext2", "seq_len": args.seq_len, "budget": args.budget,
           "held_out_windows": 32, "eval_windows": args.eval_windows, "dense_perplexity": dense_ppl,
           "gradient_time_s": grad_s, "threads": args.threads, "command": ["python", *sys.argv], "settings": {}}
    for name, (n, group) in settings.items():
        hg = [rows(g, n, group) for g in heads]
        ng = [rows(g, n, group) for g in neurons]
        hm, nm = search_mask([fisher_importance(g).double() for g in hg], [fisher_importance(g).double() for g in ng],
                             [c.head for c in cost.layers], [c.neuron for c in cost.layers], allowed)
        hm = [rearrange_mask(m, g) for m, g in zip(hm, hg)]
        nm = [rearrange_mask(m, g) for m, g in zip(nm, ng)]
        in_sample = sum(float(fisher_loss_increase(m, g)) for m, g in zip(hm + nm, hg + ng)) / hg[0].shape[0]
        held_out = sum(float(fisher_loss_increase(m, g[held])) for m, g in zip(hm + nm, heads + neurons)) / 32
        net = copy.deepcopy(model)
        sel = Selection.from_masks(hm, nm)
        apply_selection(get_adapter(net), sel)
        ppl = task.evaluate(net, tok, device="cpu", limit=args.eval_windows, seq_len=args.seq_len,
                            batch_size=4).metrics["perplexity"]
        out["settings"][name] = {"windows": n, "grad_batch": group, "rows": int(hg[0].shape[0]),
                                 "fisher_loss_per_row_in_sample": in_sample,
                                 "fisher_loss_per_row_held_out": held_out, "perplexity": ppl,
                                 "flops_kept": cost.fraction(sel)}
        print(f"{name:28s} rows {hg[0].shape[0]:3d}  Fisher loss/row in-sample {in_sample:.4g}  "
              f"held-out {held_out:.4g}  ppl {ppl:.2f}", flush=True)
        del net
    print(f"dense ppl {dense_ppl:.2f}; gradients of 96 windows: {grad_s:.0f} s")
    path = ROOT / "results" / "benchmarks" / "fisher_rows_smollm2.json"
    write_json_atomic(path, out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
