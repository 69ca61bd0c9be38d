"""STAT plugin vs the ~150-line STAT prototype, on the same fine-tuned encoder (issue 17).

The prototype (``../shared/reference/stat_prototype.py``, kept outside the project; its
path is ``--prototype``) prunes a fine-tuned BERT uniformly per layer: ID selection by
pivoted Cholesky of the activation Gram (heads through an H x H Gram of per-head traces
scaled by the output-projection norms), least-squares head correction and interpolative
neuron correction folded into the next projections, layers in sequence, 512 random
training examples (``random.Random(seed).sample``). Its functions are loaded from that file
(everything before its driver loop) and run unchanged -- as its author runs them -- except
that the calibration seed is ours, so that the run-to-run noise can be measured.

For every calibration seed, on the same dense model:

* ``prototype`` at each width fraction ``--fractions`` (kept heads and neurons per layer);
* the plugin's methods (``--methods``, default ``stat,stat-uniform``) at the FLOPs budgets
  that those width fractions cost (``widths W`` rows: ``stat-uniform`` then keeps exactly
  the prototype's widths) and at the FLOPs budgets ``--budgets`` (``FLOPs B`` rows);
* ``--variant LABEL:opt=value,opt=value`` adds a plugin run of ``--variant-method`` with
  those STAT options, one switch toward the prototype's choice per variant (the ablation), e.g.
  ``--variant sublayer:stat_sequential=sublayer --variant damp1e-8:stat_damping=1e-8
  --variant trace:stat_head_rule=trace --variant uncentred:stat_center=false``.

Every pruned model is evaluated by the harness's task (GLUE dev metric x 100; also on
the even (a) and odd (b) dev examples, to choose on one half and confirm on the other). Writes ``results/benchmarks/stat_vs_prototype-<task>.json`` (every run) and
``.md`` (mean +- spread across seeds: the spread is max - min; a difference smaller than it
is not a result), e.g.

    python benchmarks/stat_vs_prototype.py --task sst2 --model /work/ft/minilm-sst2 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROTOTYPE = ROOT.parent / "shared" / "reference" / "stat_prototype.py"
PRIMARY = {"sst2": "accuracy", "mrpc": "f1", "stsb": "spearmanr", "rte": "accuracy", "cola": "matthews_correlation"}


def load_prototype(path: Path, model_dir: str, data_dir: str, task: str) -> dict[str, Any]:
    """The prototype's definitions (imports, helpers, ``prune``), without its driver: the
    statements before its first ``... = load(TASK)`` run with its usual ``sys.argv``."""
    if not path.is_file():
        raise SystemExit(f"--prototype {str(path)!r} is not a file; give the path of stat_prototype.py")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    body = []
    for node in tree.body:
        call = getattr(node, "value", None)
        if isinstance(node, ast.Assign) and isinstance(call, ast.Call) and getattr(call.func, "id", "") == "load":
            break
        body.append(node)
    ns: dict[str, Any] = {"__name__": "stat_prototype", "__file__": str(path)}
    argv = sys.argv
    sys.argv = [str(path), model_dir, data_dir, task, "/dev/null"]
    try:
        exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102
    finally:
        sys.argv = argv
    for name in ("load", "prune", "evaluate"):
        if name not in ns:
            raise SystemExit(f"{path}: no function {name!r} before the driver; is it the STAT prototype?")
    return ns


def width_budget(model: torch.nn.Module, seq_len: int, frac: float) -> float:
    """FLOPs fraction of the prototype's widths: round(frac * n) heads / neurons per layer
    (at least 1), as its ``prune`` computes them."""
    from tshrink.arch.families import get_adapter
    from tshrink.cost import CostModel

    ad = get_adapter(model)
    widths = {"heads": [max(1, round(frac * n)) for n in ad.head_counts()],
              "neurons": [max(1, round(frac * n)) for n in ad.neuron_counts()]}
    return CostModel(ad, seq_len).fraction(widths)


def _variant(text: str) -> tuple[str, dict[str, str]]:
    label, sep, rest = text.partition(":")
    if not sep or not label.strip():
        raise SystemExit(f"--variant {text!r} is not LABEL:opt=value[,opt=value]")
    opts = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = pair.partition("=")
        if not eq:
            raise SystemExit(f"--variant {text!r}: {pair!r} is not opt=value")
        opts[key.strip()] = value.strip()
    return label.strip(), opts


def summarise(records: list[dict[str, Any]], metric: str) -> str:
    """Markdown table: rows = setting, columns = run label, cells = mean +- spread (n seeds)."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    settings: list[str] = []
    labels: list[str] = []
    for r in records:
        if r["label"] == "dense":
            continue
        if r["setting"] not in settings:
            settings.append(r["setting"])
        if r["label"] not in labels:
            labels.append(r["label"])
        groups.setdefault((r["setting"], r["label"]), {}).setdefault("v", []).append(r["metrics"][metric])
    others = [lab for lab in labels if lab != "prototype"] if "prototype" in labels else []
    head = labels + [f"{lab} − prototype" for lab in others]
    lines = ["| setting | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for s in settings:
        cells = []
        for lab in labels:
            v = groups.get((s, lab), {}).get("v")
            cells.append("" if not v else f"{statistics.mean(v):.1f} ± {max(v) - min(v):.1f} ({len(v)})")
        proto = groups.get((s, "prototype"), {}).get("v")
        cells += [verdict(groups.get((s, lab), {}).get("v"), proto) for lab in others]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(values: list[float] | None, proto: list[float] | None) -> str:
    """Difference of the means against the noise, the larger of the two seed spreads
    (max - min): 'below' only when the method is below the prototype by more than that."""
    if not values or not proto:
        return ""
    diff = statistics.mean(values) - statistics.mean(proto)
    if min(len(values), len(proto)) < 2:
        return f"{diff:+.1f} (1 seed: no noise estimate)"
    noise = max(max(values) - min(values), max(proto) - min(proto))
    word = "**below**" if diff < -noise else ("above" if diff > noise else "within noise")
    return f"{diff:+.1f} (noise {noise:.1f}: {word})"


def merge(paths: list[str], stem: Path) -> str:
    """One table from several runs' JSON files of the same task and model (e.g. seeds run as
    separate jobs): records concatenated, ``.md`` rewritten, ``.json`` lists the sources."""
    parts = [json.loads(Path(q).read_text(encoding="utf-8")) for q in paths]
    first = parts[0]
    for q, d in zip(paths, parts):
        if (d["task"], d["model"]) != (first["task"], first["model"]):
            raise SystemExit(f"--merge: {q} is {d['task']} on {d['model']}, not {first['task']} on {first['model']}")
    records = [first["records"][0]] + [r for d in parts for r in d["records"] if r["label"] != "dense"]
    metric = first["metric"]
    tables = "\n\n".join(f"{part} dev examples:\n\n{summarise(records, key)}" for part, key in
                          (("all", metric), ("a (even)", "a:" + metric), ("b (odd)", "b:" + metric)))
    md = (f"# STAT plugin vs prototype: {first['task']} ({metric} x 100)\n\n"
          f"Model `{first['model']}`, dense {first['dense'][metric]:.1f}; {first['calib_samples']} calibration "
          f"examples; cells: mean ± (max - min) (number of seeds). 'widths W' = the prototype's uniform widths "
          f"(plugin at their FLOPs), 'FLOPs B' = the plugin's budget. Merged from:\n\n"
          + "".join(f"- `{d['command']}`{'' if d.get('complete') else ' (incomplete)'}\n" for d in parts)
          + f"\n{tables}\n")
    from tshrink.checkpoint import write_json_atomic

    write_json_atomic(stem.with_suffix(".json"), {**first, "merged_from": [d["command"] for d in parts],
                                                  "records": records})
    stem.with_suffix(".md").write_text(md, encoding="utf-8")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(PRIMARY))
    p.add_argument("--model", required=True, help="fine-tuned model directory (harness finetune --output)")
    p.add_argument("--prototype", default=str(DEFAULT_PROTOTYPE))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds (same seed = same examples for all)")
    p.add_argument("--fractions", default="0.6,0.5,0.4", help="prototype width fractions ('' for none)")
    p.add_argument("--budgets", default="0.6,0.5,0.4", help="plugin FLOPs budgets ('' for none; on MiniLM at "
                   "seq 128 the widths 60/50/40 %% cost 59.5/50.1/40.7 %% of the FLOPs)")
    p.add_argument("--methods", default="stat,stat-uniform", help="plugin methods ('' for none)")
    p.add_argument("--no-prototype", action="store_true", help="skip the prototype runs")
    p.add_argument("--variant", action="append", default=[], help="LABEL:stat_opt=value,... (repeatable)")
    p.add_argument("--variant-method", default="stat-uniform")
    p.add_argument("--variant-settings", default="widths", choices=("widths", "flops", "both"))
    p.add_argument("--opt", action="append", default=[], help="stat option name=value for every plugin run")
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--order", default="seeds", choices=("seeds", "settings"),
                   help="outer loop: every setting of a seed first ('seeds') or every seed of a setting first")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="output stem (default results/benchmarks/stat_vs_prototype-TASK)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only rebuild one table (--out) from these runs' JSON files")
    args = p.parse_args(argv)
    if args.merge:
        print(merge(args.merge, Path(args.out) if args.out else
                    ROOT / "results" / "benchmarks" / f"stat_vs_prototype-{args.task}"))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    common = dict(_variant("opt:" + ",".join(args.opt))[1]) if args.opt else {}
    variants = [_variant(v) for v in args.variant]
    for f in fractions + budgets:
        if not 0 < f <= 1:
            raise SystemExit(f"fraction / budget {f} is not in (0, 1]")

    from tshrink.checkpoint import write_json_atomic
    from tshrink.models import load_model
    from tshrink.pipeline import prune
    from tshrink_harness.tasks.registry import get_task

    task = get_task(args.task)
    model, tok = load_model(args.model, head=task.head)
    task.check_model(model.config, args.model)
    task.prepare(Path(args.data_dir), need_train=True)
    proto = None if args.no_prototype or not fractions else load_prototype(
        Path(args.prototype), args.model, args.data_dir, args.task)
    metric = PRIMARY[args.task]
    keys = {"all": metric, "a (even)": "a:" + metric, "b (odd)": "b:" + metric}
    from tshrink.manager import get_plugin_manager

    score_options = {o.name for specs in get_plugin_manager().hook.tshrink_stages() for st in specs
                     if st.kind == "score" and st.name == "stat" for o in st.options}

    from tshrink_harness.metrics.glue_metric.glue_scores import glue_scores
    from tshrink_harness.tasks.glue import encode_glue

    examples = task._eval  # the dev split, as task.evaluate reads it
    refs = [e["label"] for e in examples]

    def evaluate(net: torch.nn.Module) -> dict[str, float]:
        """The task's dev metrics x 100 (task.evaluate's loop: same encoding, argmax or score,
        glue_scores), on all dev examples and on the even ('a:') / odd ('b:') halves."""
        preds: list[Any] = []
        net.eval()
        with torch.inference_mode():
            for i in range(0, len(examples), 64):
                enc = encode_glue(examples[i:i + 64], tok, max_length=args.seq_len)
                enc.pop("labels", None)
                logits = net(**enc).logits.float()  # (batch, labels)
                preds += (logits[:, 0] if task.num_labels == 1 else logits.argmax(-1)).tolist()
        out = {}
        for prefix, sl in (("", slice(None)), ("a:", slice(0, None, 2)), ("b:", slice(1, None, 2))):
            out.update({prefix + k: 100 * float(v) for k, v in glue_scores(args.task, preds[sl], refs[sl]).items()})
        return out

    model.eval()
    dense = evaluate(model)
    records: list[dict[str, Any]] = [{"label": "dense", "setting": "dense", "metrics": dense}]
    print(f"dense {dense}", flush=True)
    settings = [(f"widths {f:.0%}", width_budget(model, args.seq_len, f), f) for f in fractions]
    settings += [(f"FLOPs {b:.0%}", b, None) for b in budgets]
    proto_train = proto["load"](args.task)[0] if proto else None

    stem = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / f"stat_vs_prototype-{args.task}"
    command = "python benchmarks/stat_vs_prototype.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    def write(complete: bool) -> str:
        """Both files, after every run (a stopped benchmark keeps what it measured)."""
        tables = "\n\n".join(f"{part} dev examples:\n\n{summarise(records, key)}" for part, key in keys.items())
        result = {"task": args.task, "model": args.model, "metric": metric, "dev_examples": len(examples),
                  "dense": dense, "seeds": seeds, "calib_samples": args.calib_samples, "seq_len": args.seq_len,
                  "prototype": args.prototype if proto else None, "command": command, "complete": complete,
                  "records": records}
        write_json_atomic(stem.with_suffix(".json"), result)
        md = (f"# STAT plugin vs prototype: {args.task} ({metric} x 100)\n\n"
              f"Model `{args.model}`, dense {dense[metric]:.1f}; {args.calib_samples} calibration examples, "
              f"seeds {seeds}{'' if complete else ' (INCOMPLETE: stopped early)'}; cells: mean ± (max - min) "
              f"(number of seeds). 'widths W' = the prototype's uniform widths (plugin at their FLOPs), "
              f"'FLOPs B' = the plugin's budget.\n\nCommand: `{command}`\n\n{tables}\n")
        stem.with_suffix(".md").write_text(md, encoding="utf-8")
        return md

    calibs: dict[int, Any] = {}
    cached: dict[tuple[int, str], Any] = {}  # the 'stat' score stage per seed, reused across budgets and methods
    pairs = ([(seed, st) for seed in seeds for st in settings] if args.order == "seeds"
             else [(seed, st) for st in settings for seed in seeds])
    for seed, (setting, budget, frac) in pairs:
        if seed not in calibs:
            calibs[seed] = task.calibration(tok, samples=args.calib_samples, seq_len=args.seq_len, seed=seed,
                                            batch_size=32)
        calib = calibs[seed]
        runs: list[tuple[str, str, dict[str, str], str, float, float | None]] = []
        if frac is not None and proto is not None:
            runs.append(("prototype", "", {}, setting, budget, frac))
        for m in methods:
            runs.append((m, m, dict(common), setting, budget, frac))
        if variants and (args.variant_settings == "both" or (args.variant_settings == "widths") == (frac is not None)):
            for label, opts in variants:
                runs.append((label, args.variant_method, {**common, **opts}, setting, budget, frac))
        for label, method, opts, setting, budget, frac in runs:
            net = copy.deepcopy(model)
            t = time.perf_counter()
            rec: dict[str, Any] = {"label": label, "setting": setting, "seed": seed, "budget": budget}
            if method == "":
                sample = random.Random(seed).sample(proto_train, min(args.calib_samples, len(proto_train)))
                with torch.no_grad():
                    proto["prune"](net, sample, frac, "stat")
                rec.update(method="stat_prototype.py (how='stat')", fraction=frac)
            else:
                # the stat-family methods share score stage 'stat': reuse it (same options); others rescore
                key = repr(sorted((k, v) for k, v in opts.items() if k in score_options)) \
                    if method.startswith("stat") else None
                res = prune(net, method, budget, calib=calib, seq_len=args.seq_len, options=opts, seed=seed,
                            scores=cached.get((seed, key)) if key else None)
                if key:
                    cached[(seed, key)] = res.scores
                rec.update(method=method, options=opts, flops_kept=res.report["flops_kept"],
                           widths=res.report["widths_after"])
            rec["prune_s"] = round(time.perf_counter() - t, 2)
            rec["metrics"] = evaluate(net)
            records.append(rec)
            write(False)
            print(f"seed {seed} {setting:11s} {label:24s} {metric} {rec['metrics'][metric]:6.2f} "
                  f"({rec['prune_s']:.1f} s)", flush=True)
            del net

    print(write(True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
