"""The ``harness`` command.

Heavy modules (torch, transformers, fvcore) are imported inside the sub-commands, so
``harness --help``, ``harness plugins`` and ``harness tasks`` stay instant.
"""
from __future__ import annotations

import argparse
import json
import os
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


CALIBRATION_NOTE = ("--calib-samples, the same data for every method of a compare; task defaults: GLUE 2048 "
                    "training examples drawn with replacement (Kwon et al.'s public code), SQuAD 128 windows, "
                    "decoders 32 windows of --seq-len (see `harness tasks`)")


def _sizes(text: str) -> list[int] | None:
    """Batch sizes from '1,32' (None for 'auto'); SystemExit with the reason when one is not a positive integer."""
    if text.strip().lower() == "auto":
        return None
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"harness: error: --latency-batch {text!r} is not a list of positive batch sizes, e.g. 1,32")
    return sizes


def _gen_sizes(text: str) -> list[int] | None:
    """--gen-batch: 'auto' (None), '0' (not measured: []) or positive batch sizes; SystemExit otherwise."""
    if text.strip() == "0":
        return []
    try:
        return _sizes(text)
    except SystemExit:
        raise SystemExit(f"harness: error: --gen-batch {text!r} is not 'auto', 0 or a list of positive batch "
                         f"sizes, e.g. 1,8") from None


def _pricing(text: str) -> str | int:
    from .run import parse_pricing

    try:
        return parse_pricing(text)
    except ValueError as err:
        raise SystemExit(f"harness: error: {err}") from None


def _block(args: argparse.Namespace) -> None:
    """--block NAME on prune / compare: the same as TSHRINK_BLOCK_PLUGINS=NAME for this run."""
    from tshrink.manager import ENV_BLOCK

    if getattr(args, "block", None):
        os.environ[ENV_BLOCK] = ",".join(filter(None, [os.environ.get(ENV_BLOCK, ""), *args.block]))


def cmd_plugins(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from tshrink.manager import get_plugin_manager
    from tshrink.registry import Registry

    from tshrink.arch.catalog import architecture_rows  # plain data: no torch import

    reg = Registry(get_plugin_manager(autoload=not args.no_autoload, block=args.block or ()))
    rows, problems = reg.rows(), [p.row() for p in reg.problems]
    if args.json:
        print(json.dumps({"methods": rows, "problems": problems, "architectures": architecture_rows()}, indent=2))
        return 0
    table = [{k: (v + " *" if k == "method" and r["headline"] else v) for k, v in r.items() if k != "headline"}
             for r in rows]
    print(tabulate(table, headers="keys", tablefmt="github"))
    print("\n* headline method: `harness compare` runs it when no --methods are given")
    if args.options:
        for name in sorted(reg.methods):
            opts = reg.options(reg.methods[name])
            if opts:
                print(f"\n{name}:")
                if reg.needs(reg.methods[name].recipe)["calibration"]:
                    print(f"  calibration: {CALIBRATION_NOTE}")
                for o in opts.values():
                    print(f"  --opt {o.name}={o.default!r}  {o.help}")
    print("\nSupported architectures (structured pruning; quantization works on any):")
    print(tabulate(architecture_rows(), headers="keys", tablefmt="github"))
    if problems:
        print(f"\n{len(problems)} problem(s): these plugins or methods are not usable (the others are):")
        print(tabulate(problems, headers="keys", tablefmt="github"))
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

    _block(args)
    report = prune_to_dir(model=args.model, method=args.method, budget=_budgets(args.flops)[0],
                          output=args.output, options=_opts(args.opt), calib_samples=args.calib_samples,
                          seq_len=args.seq_len, data_dir=args.data_dir, device=args.device, seed=args.seed,
                          task=args.task, overwrite=args.overwrite, dtype=args.dtype,
                          device_memory=args.device_memory, offload=args.offload)
    keys = ("method", "task", "budget", "flops_kept", "seq_len", "fvcore_flops_before", "fvcore_flops_after",
            "params_before", "params_after", "time_s")
    for k in keys:
        print(f"{k:>22}: {report.get(k)}")
    print(f"{'output':>22}: {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    from .records import failed

    _block(args)
    budgets = _budgets(args.flops)
    reference = None if args.reference.lower() == "none" else args.reference
    if args.executor != "ray" and (args.address is not None or args.gpus_per_run or args.cpus_per_run != 1):
        raise ValueError("--address, --gpus-per-run and --cpus-per-run apply to --executor ray only")
    recs = compare(
        methods=args.methods, model=args.model, task=args.task, budgets=budgets, options=_opts(args.opt),
        calib_samples=args.calib_samples, eval_samples=args.eval_samples, seq_len=args.seq_len,
        data_dir=args.data_dir, device=args.device, dtype=args.dtype, seed=args.seed, results_dir=args.results,
        lmeval_include=args.lmeval_include, squad_split=args.squad_split, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        latency_batch=_sizes(args.latency_batch), latency_warmup=args.latency_warmup,
        latency_repeats=args.latency_repeats, latency_min_time=args.latency_min_time,
        latency_threads=args.latency_threads, flops_seq_len=_pricing(args.flops_seq_len),
        generation_batch=_gen_sizes(args.gen_batch), generation_prompt=args.gen_prompt,
        generation_tokens=args.gen_tokens, eval_device_map=args.eval_device_map,
        eval_max_memory=args.eval_max_memory, device_memory=args.device_memory, offload=args.offload,
        leaderboard=not args.no_leaderboard, reference=reference, executor=args.executor,
        ray_address=args.address, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
        command=["harness", *sys.argv[1:]] if args.argv is None else ["harness", *args.argv])
    return 1 if any(failed(r) for r in recs) else 0


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
    p.add_argument("--debug", action="store_true", help="print the traceback of every error (also TSHRINK_DEBUG=1)")
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
        s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when present; default cpu)")
        s.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 (GPU only) or "
                       "float32: load and run in it; statistics in float32/64; saved in it")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--block", action="append", metavar="NAME", help="plugin (entry-point) name not to load "
                       "(e.g. a broken third-party plugin); repeatable; also TSHRINK_BLOCK_PLUGINS")

    s = sub.add_parser("prune", help="prune one model and write the checkpoint and a JSON report")
    s.add_argument("--method", required=True, help="method name or recipe 'score=..,select=..,correct=..'")
    s.add_argument("--flops", required=True, help="fraction of FLOPs kept, in (0, 1]")
    s.add_argument("--output", required=True, help="directory for the pruned checkpoint: new, empty, or (with "
                   "--overwrite) a checkpoint the toolkit wrote")
    s.add_argument("--overwrite", action="store_true", help="replace --output if it holds a checkpoint the toolkit "
                   "wrote (tshrink.json); any other non-empty directory is never replaced")
    s.add_argument("--device-memory", default=None, help="memory usable on the device, e.g. 40GiB (default: "
                   "what is free); a model that does not fit keeps its layers on the host, one at a time on the device")
    s.add_argument("--offload", default="auto", choices=("auto", "always", "never"),
                   help="layer-wise offload: when the model does not fit (auto), always, or never")
    common(s)
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("compare", help="prune with several methods and budgets, evaluate, tabulate, record")
    s.add_argument("--methods", default=None, help="comma-separated methods (recipes: separate with ';'); "
                   "default: the headline methods, see `harness plugins`")
    s.add_argument("--flops", default="0.8,0.6", help="comma-separated kept-FLOPs fractions (default 0.8,0.6)")
    s.add_argument("--eval-samples", type=int, default=None,
                   help="evaluation examples / windows / lm-eval docs (default per task; 0 = whole split)")
    s.add_argument("--batch-size", type=int, default=8, help="calibration and evaluation batch size")
    s.add_argument("--latency-batch", default="auto", help="batch sizes of the latency measurement, e.g. 1,32; auto "
                   "(default): 1,32 on a GPU (batch 1 and a compute-bound batch), 1 on the CPU, where one sequence "
                   "of --seq-len tokens already keeps the cores busy; dense and pruned are timed interleaved")
    s.add_argument("--latency-warmup", type=int, default=2, help="untimed passes per model first")
    s.add_argument("--latency-repeats", type=int, default=5, help="interleaved rounds (each a torch.utils.benchmark "
                   "adaptive autorange per model); the median and quartiles over rounds are reported")
    s.add_argument("--latency-min-time", type=float, default=0.2, help="seconds per model per round (autorange)")
    s.add_argument("--latency-threads", type=int, default=None, help="torch threads while timing (default: "
                   "torch's current count), pinned for the whole measurement and recorded")
    s.add_argument("--eval-device-map", default=None, help="evaluate (perplexity, lm-eval) through accelerate's "
                   "device_map dispatch: auto, balanced, balanced_low_0 or sequential over the GPUs, the CPU and the "
                   "disk (default: the model on --device; auto under layer offload)")
    s.add_argument("--eval-max-memory", default=None, help="with --eval-device-map: memory per device, e.g. "
                   "0=20GiB,1=20GiB,cpu=60GiB (the rest goes to disk)")
    s.add_argument("--device-memory", default=None, help="prune placement as in `harness prune`: memory usable on "
                   "the device; a model that does not fit keeps its layers on the host (then the evaluation is "
                   "dispatched and latency / generation are not timed)")
    s.add_argument("--offload", default="auto", choices=("auto", "always", "never"),
                   help="layer-wise offload of the prune: when the model does not fit (auto), always, or never")
    s.add_argument("--gen-batch", default="auto", help="decoders: batch sizes of the generation throughput (greedy "
                   "decoding with the KV cache, dense and pruned timed interleaved as the latency), e.g. 1,32; auto "
                   "(default): 1,32 on a GPU, 1,8 on the CPU; 0: not measured")
    s.add_argument("--gen-prompt", type=int, default=32, help="decoders: prompt tokens before generation (default 32)")
    s.add_argument("--gen-tokens", type=int, default=16, help="decoders: tokens generated per sequence and timing "
                   "(default 16; 0: not measured)")
    s.add_argument("--flops-seq-len", default="padded", help="length the FLOPs budget is priced at: padded "
                   "(--seq-len), avg (the calibration data's mean real length, as Kwon et al.'s code) or a number")
    s.add_argument("--lmeval-include", default=None, help="folder of local lm-eval task YAMLs (--task lmeval:NAME)")
    s.add_argument("--squad-split", default=None, help="SQuAD dev-article split, e.g. dev-articles:train=0-23,eval=24-47")
    s.add_argument("--num-beams", type=int, default=None, help="translation: beam size (default 1, greedy)")
    s.add_argument("--max-new-tokens", type=int, default=None, help="translation: most generated tokens (default 256)")
    s.add_argument("--results", default="runs", help="directory for your JSON records and LEADERBOARD.md "
                   "(default runs/; the project's committed figures live in results/)")
    s.add_argument("--reference", default="results", help="results directory whose records with the same keys are "
                   "shown beside the ones computed now, differences flagged (default results/; 'none' to skip)")
    s.add_argument("--no-leaderboard", action="store_true", help="do not rebuild LEADERBOARD.md afterwards")
    s.add_argument("--executor", default="serial", choices=("serial", "ray"), help="serial: this process (default); "
                   "ray: the dense row and each run as Ray tasks, methods in parallel (pip install 'tshrink[ray]')")
    s.add_argument("--address", default=None, help="Ray cluster: auto (a running local cluster) or HOST:PORT "
                   "(default: start a local Ray instance)")
    s.add_argument("--gpus-per-run", type=float, default=0, help="GPUs each Ray task needs (runs then use --device cuda)")
    s.add_argument("--cpus-per-run", type=float, default=1, help="CPUs each Ray task needs (and its torch threads)")
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
    s.add_argument("--results", default="runs", help="results directory (default runs/, where compare writes; "
                   "the project's committed leaderboard: --results results)")
    s.set_defaults(func=cmd_leaderboard)
    for parser in {id(q): q for q in sub.choices.values()}.values():  # `harness CMD ... --debug` too
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="print the traceback of every error (also TSHRINK_DEBUG=1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    debug = bool(getattr(args, "debug", False) or os.environ.get("TSHRINK_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error becomes one line (and a traceback for bugs)
        return report_error(err, debug=debug)


#: OSErrors that describe the user's files or machine (a path, permissions, a full disk), not a bug.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def report_error(err: BaseException, *, debug: bool = False) -> int:
    """Print ``err`` for a person and return the exit code.

    Bad input (ValueError, a missing / unwritable path, a full disk): one line, exit 2. A failure
    inside a plugin's stage (``tshrink.errors.StageError``): one line naming the plugin, package,
    version, stage, method and budget, exit 1. Anything else is a bug in the toolkit or a plugin:
    its traceback, then one line saying so, exit 1. ``--debug`` (or ``TSHRINK_DEBUG=1``) prints
    the traceback in every case."""
    import errno
    import traceback

    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if hasattr(err, "plugin") and hasattr(err, "stage"):  # tshrink.errors.StageError
        print(f"harness: error: {err}" + ("" if debug else " (--debug shows the traceback)"), file=sys.stderr)
        return 1
    if isinstance(err, ValueError) or isinstance(err, _USER_OS_ERRORS) or (
            isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)):
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err.strerror or ""):
            text = f"{err.strerror or err}: {err.filename}"
        else:
            text = str(err)
        print(f"harness: error: {text}", file=sys.stderr)
        return 2
    if not debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"harness: internal error ({type(err).__name__}: {err}) -- a bug in tshrink or in a plugin, not in "
          f"your input; please report it with the traceback above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
