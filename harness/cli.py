"""The ``harness`` command.

Heavy modules (torch, transformers, fvcore) are imported inside the sub-commands, so
``harness --help``, ``harness plugins`` and ``harness tasks`` stay instant.
"""
from __future__ import annotations

import argparse
import json
import sys


def _opts(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"harness: error: --opt {pair!r} is not name=value")
        out[key.strip()] = value.strip()
    return out


def _budgets(text: str) -> list[float]:
    """Kept-FLOPs fractions from '0.8,0.6'; SystemExit with the reason when one does not parse."""
    from tshrink.cost import check_budget

    parts = [b.strip() for b in text.split(",")]
    if not any(parts):
        raise SystemExit(f"harness: error: --flops {text!r} names no budget; give e.g. 0.8,0.6")
    try:
        values = [check_budget(b) for b in parts]
    except ValueError as err:
        raise SystemExit(f"harness: error: --flops {text!r}: {err}") from None
    return list(dict.fromkeys(values))


def cmd_plugins(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from tshrink.manager import get_plugin_manager
    from tshrink.registry import Registry

    reg = Registry(get_plugin_manager(autoload=not args.no_autoload, block=args.block or ()))
    if args.json:
        print(json.dumps(reg.rows(), indent=2))
        return 0
    print(tabulate(reg.rows(), headers="keys", tablefmt="github"))
    if args.options:
        for name in sorted(reg.methods):
            opts = reg.options(reg.methods[name])
            if opts:
                print(f"\n{name}:")
                for o in opts.values():
                    print(f"  --opt {o.name}={o.default!r}  {o.help}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .tasks.registry import get_task, task_names

    rows = [get_task(n).row() for n in task_names()]
    rows.append({"task": "lmeval:<name>[,<name>...]", "kind": "lmeval", "model": "causal", "head": "causal-lm",
                 "metrics": "<task>/<metric>, mean_acc", "main": "mean_acc",
                 "data": "<data>/lm-eval/<task>/<split>.jsonl, else the hub; own YAMLs: --lmeval-include DIR"})
    rows.append({"task": "<task>+<task>", "kind": "suite", "model": "the tasks'", "head": "the tasks'",
                 "metrics": "<task>/<metric>", "main": "the last task's",
                 "data": "the tasks' (e.g. wikitext2+zeroshot: one prune, both evaluations)"})
    print(json.dumps(rows, indent=2) if args.json else tabulate(rows, headers="keys", tablefmt="github"))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .run import prune_to_dir

    report = prune_to_dir(model=args.model, method=args.method, budget=_budgets(args.flops)[0],
                          output=args.output, options=_opts(args.opt), calib_samples=args.calib_samples,
                          seq_len=args.seq_len, data_dir=args.data_dir, device=args.device, seed=args.seed,
                          task=args.task)
    keys = ("method", "task", "budget", "flops_kept", "fvcore_flops_before", "fvcore_flops_after",
            "params_before", "params_after", "time_s")
    for k in keys:
        print(f"{k:>22}: {report.get(k)}")
    print(f"{'output':>22}: {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    budgets = _budgets(args.flops)
    compare(methods=args.methods, model=args.model, task=args.task, budgets=budgets, options=_opts(args.opt),
            calib_samples=args.calib_samples, eval_samples=args.eval_samples, seq_len=args.seq_len,
            data_dir=args.data_dir, device=args.device, seed=args.seed, results_dir=args.results,
            lmeval_include=args.lmeval_include, squad_split=args.squad_split, num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            latency_batch=args.latency_batch, latency_warmup=args.latency_warmup,
            latency_repeats=args.latency_repeats, leaderboard=not args.no_leaderboard,
            command=["harness", *sys.argv[1:]] if args.argv is None else ["harness", *args.argv])
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    rec = finetune(task=args.task, model=args.model, output=args.output, epochs=args.epochs, lr=args.lr,
                   batch_size=args.batch_size, max_length=args.max_length, warmup_ratio=args.warmup_ratio,
                   weight_decay=args.weight_decay, seed=args.seed, max_train_samples=args.max_train_samples,
                   max_eval_samples=args.max_eval_samples, data_dir=args.data_dir, device=args.device,
                   squad_split=args.squad_split, force=args.force,
                   command=["harness", *(args.argv if args.argv is not None else sys.argv[1:])])
    split = rec["dev_evaluation"].get("split", "dev")
    for k, v in sorted(rec["dev_metrics"].items()):
        print(f"{k:>16}: {v:.4f}   [{rec['task']['name']}, {split}]")
    print(f"{'train time s':>16}: {rec['train']['time_s']:.1f} ({rec['train']['steps']} steps, "
          f"{rec['train']['examples']} examples)")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import build

    print(build(args.results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Compress transformers without retraining and compare methods.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("plugins", aliases=["ls"], help="list methods: stages, needs, paper, package and version")
    s.add_argument("--options", action="store_true", help="also list every method's options")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-autoload", action="store_true", help="do not load entry-point plugins")
    s.add_argument("--block", action="append", help="plugin (entry-point) name not to load; repeatable")
    s.set_defaults(func=cmd_plugins)

    s = sub.add_parser("tasks", help="list evaluation tasks: kind, model, head, metrics, data layout")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tasks)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--model", default=None, help="built-in name (minilm, smollm2), local directory, or hub id "
                       "(default: smollm2; minilm for encoder tasks)")
        s.add_argument("--task", default=None, help="evaluation / calibration task (see `harness tasks`; default: "
                       "perplexity on Python docs for decoders, embedding agreement for encoders, translation "
                       "for encoder-decoders)")
        s.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help="method option; repeatable")
        s.add_argument("--calib-samples", type=int, default=None, help="calibration examples (default per task)")
        s.add_argument("--seq-len", type=int, default=None, help="sequence length: calibration, FLOPs, evaluation")
        s.add_argument("--data-dir", default=None, help="local data directory (default $TSHRINK_DATA_DIR)")
        s.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("prune", help="prune one model and write the checkpoint and a JSON report")
    s.add_argument("--method", required=True, help="method name or recipe 'score=..,select=..,correct=..'")
    s.add_argument("--flops", required=True, help="fraction of FLOPs kept, in (0, 1]")
    s.add_argument("--output", required=True, help="directory for the pruned checkpoint")
    common(s)
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("compare", help="prune with several methods and budgets, evaluate, tabulate, record")
    s.add_argument("--methods", default=None, help="comma-separated methods (recipes: separate with ';'); "
                   "default: the headline methods, see `harness plugins`")
    s.add_argument("--flops", default="0.8,0.6", help="comma-separated kept-FLOPs fractions (default 0.8,0.6)")
    s.add_argument("--eval-samples", type=int, default=None,
                   help="evaluation examples / windows / lm-eval docs (default per task; 0 = whole split)")
    s.add_argument("--batch-size", type=int, default=8, help="calibration and evaluation batch size")
    s.add_argument("--latency-batch", type=int, default=1, help="batch size of the latency measurement")
    s.add_argument("--latency-warmup", type=int, default=2)
    s.add_argument("--latency-repeats", type=int, default=5)
    s.add_argument("--lmeval-include", default=None, help="folder of local lm-eval task YAMLs (--task lmeval:NAME)")
    s.add_argument("--squad-split", default=None, help="SQuAD dev-article split, e.g. dev-articles:train=0-23,eval=24-47")
    s.add_argument("--num-beams", type=int, default=None, help="translation: beam size (default 1, greedy)")
    s.add_argument("--max-new-tokens", type=int, default=None, help="translation: most generated tokens (default 256)")
    s.add_argument("--results", default="results", help="directory for the JSON records and LEADERBOARD.md")
    s.add_argument("--no-leaderboard", action="store_true", help="do not rebuild LEADERBOARD.md afterwards")
    common(s)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("finetune", help="fine-tune a pretrained encoder on a GLUE task or SQuAD (cached)")
    s.add_argument("--task", required=True, help="GLUE task (sst2, mrpc, stsb, rte, ...) or squad / squad_v2")
    s.add_argument("--model", default="minilm", help="pretrained encoder (default minilm)")
    s.add_argument("--output", default=None, help="checkpoint directory (default: under the tshrink cache)")
    s.add_argument("--epochs", type=float, default=3.0)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-length", type=int, default=None, help="default 128 (384 for SQuAD)")
    s.add_argument("--warmup-ratio", type=float, default=0.1)
    s.add_argument("--weight-decay", type=float, default=0.01)
    s.add_argument("--max-train-samples", type=int, default=None, help="train on a random subset (quick runs)")
    s.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on the first N dev examples")
    s.add_argument("--squad-split", default=None, help="SQuAD dev-article split (default: articles halved)")
    s.add_argument("--data-dir", default=None, help="local data directory (default $TSHRINK_DATA_DIR)")
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an --output that holds another fine-tune")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("leaderboard", help="rebuild LEADERBOARD.md and the Pareto plots from the JSON records")
    s.add_argument("--results", default="results")
    s.set_defaults(func=cmd_leaderboard)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"harness: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
