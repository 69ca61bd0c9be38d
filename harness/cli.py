"""The ``harness`` command.

Heavy modules (torch, transformers, fvcore) are imported inside the sub-commands, so
``harness --help`` and ``harness plugins`` stay instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _opts(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"harness: --opt {pair!r} is not name=value")
        out[key.strip()] = value.strip()
    return out


def _budgets(text: str) -> list[float]:
    from tshrink.cost import check_budget

    try:
        return [check_budget(b.strip()) for b in text.split(",") if b.strip()] or [check_budget(text)]
    except ValueError as err:
        raise SystemExit(f"harness: --flops {text!r}: {err}") from None


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


def cmd_prune(args: argparse.Namespace) -> int:
    from .run import prune_to_dir

    report = prune_to_dir(model=args.model, method=args.method, budget=_budgets(args.flops)[0],
                          output=args.output, options=_opts(args.opt), calib_samples=args.calib_samples,
                          seq_len=args.seq_len, data_dir=args.data_dir, device=args.device, seed=args.seed)
    keys = ("method", "budget", "flops_kept", "fvcore_flops_before", "fvcore_flops_after",
            "params_before", "params_after", "time_s")
    for k in keys:
        print(f"{k:>22}: {report.get(k)}")
    print(f"{'output':>22}: {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    compare(methods=args.methods, model=args.model, budgets=_budgets(args.flops), options=_opts(args.opt),
            calib_samples=args.calib_samples, eval_samples=args.eval_samples, seq_len=args.seq_len,
            data_dir=args.data_dir, device=args.device, seed=args.seed, results_dir=args.results)
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

    def common(s: argparse.ArgumentParser, model_default: str) -> None:
        s.add_argument("--model", default=model_default,
                       help="built-in name (minilm, smollm2), local directory, or Hugging Face hub id")
        s.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help="method option; repeatable")
        s.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default per model kind)")
        s.add_argument("--seq-len", type=int, default=None, help="sequence length for calibration and FLOPs")
        s.add_argument("--data-dir", default=None, help="local data directory (default $TSHRINK_DATA_DIR)")
        s.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("prune", help="prune one model and write the checkpoint and a JSON report")
    s.add_argument("--method", required=True, help="method name or recipe 'score=..,select=..,correct=..'")
    s.add_argument("--flops", required=True, help="fraction of FLOPs kept, in (0, 1]")
    s.add_argument("--output", required=True, help="directory for the pruned checkpoint")
    common(s, "smollm2")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("compare", help="prune with several methods and budgets, evaluate, print a table")
    s.add_argument("--methods", default=None, help="comma-separated methods/recipes (default: the headline methods, see `harness plugins`)")
    s.add_argument("--flops", default="0.8,0.6", help="comma-separated kept-FLOPs fractions")
    s.add_argument("--eval-samples", type=int, default=None, help="evaluation sequences (default per model kind)")
    s.add_argument("--results", default="results", help="directory for the JSON records")
    common(s, "smollm2")
    s.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"harness: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
