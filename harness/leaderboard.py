"""Tables and ``results/LEADERBOARD.md`` from run records alone.

``harness leaderboard`` reads ``results/runs/**/*.json`` and rewrites
``results/LEADERBOARD.md`` and ``results/plots/*.png``. Output depends on the records only
(sorted keys and rows, no timestamps, PNGs without software metadata), so two rebuilds
give byte-identical files. Records are grouped by (task, data, model, settings): each
group gets a summary table (methods as rows, budgets as columns, the task's main metric
in the cells), a detail table (every metric, FLOPs, parameters, speed-up, bits/weight,
size on disk, compression ratio) and a Pareto plot (main metric vs FLOPs kept).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import records as R

BOARD = "LEADERBOARD.md"
PLOTS = "plots"
PLOT_LIST = ".tshrink-plots.json"  # the plots the last rebuild wrote: the only files a rebuild may delete
HEADER = "# Leaderboard"


def group_key(rec: dict[str, Any]) -> str:
    return R.key_of([rec["task"]["name"], rec["task"].get("data_hash"), R.model_tag(rec["model"]["spec"]),
                     rec["model"]["hash"], rec["settings"]])


def group_slug(rec: dict[str, Any]) -> str:
    return f"{R.slug(rec['task']['name'])}-{R.model_tag(rec['model']['spec'])}-{group_key(rec)[:8]}"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _sorted(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(recs, key=lambda r: (r["method"] != "dense", r["method"], -r["budget"], r["seed"], r["record_key"]))


def _metric_name(recs: list[dict[str, Any]]) -> str:
    dense = [r for r in recs if r["method"] == "dense"]
    return (dense or recs)[0]["main_metric"]


def speedup_cell(lat: dict[str, Any], *, batch: int = 0, flops_kept: float | None = None) -> str:
    """One batch size's speed-up with its spread, or the reason it is not shown as a result:
    "noise" above the FLOPs bound (1 / FLOPs kept), "unverified" for records timed before the
    interleaved protocol (one median of 5, possibly minutes apart)."""
    if not lat.get("speedup"):
        return "-"
    if "batches" not in lat:
        if R.speedup_flag(lat["speedup"], flops_kept) == "noise":
            return f"noise ({lat['speedup']:.2f}x > 1/{flops_kept:.2f})"
        return f"{lat['speedup']:.2f}x unverified"
    if batch >= len(lat["batches"]):
        return "-"
    row = lat["batches"][batch]
    if row.get("flag") == "noise":
        return f"noise ({row['speedup']:.2f}x > 1/{lat['flops_kept_bound']:.2f})"
    return f"{row['speedup']:.2f}x [{row['speedup_q25']:.2f}-{row['speedup_q75']:.2f}]"


def fidelity_cell(rec: dict[str, Any]) -> str:
    """'as published', the deviations from the authors' code, 'n/a' where a stage recorded
    that there is no published setting, '-' where no stage recorded anything."""
    fid = rec.get("prune", {}).get("stages", {}).get("fidelity")
    if not fid:
        return "-"
    if fid.get("as_published") is None:
        return "n/a (no published setting)"
    return "as published" if fid["as_published"] else "; ".join(fid["deviations"])


def render_group(recs: list[dict[str, Any]], *, plot: str | None = None) -> str:
    """Markdown for one group of records: heading, summary table, detail table, notes."""
    from tabulate import tabulate

    recs = _sorted(recs)
    first = recs[0]
    task, settings = first["task"], first["settings"]
    main = _metric_name(recs)
    better = "higher" if task.get("higher_is_better", True) else "lower"
    split = first.get("evaluation", {}).get("split", task.get("split", "-"))
    lat = next((r["latency"]["pruned"] for r in recs if r.get("latency", {}).get("pruned")), None) or {}
    lines = [f"## {task['name']} · {R.model_tag(first['model']['spec'])}", "",
             f"model `{R.model_tag(first['model']['spec'])}` ({first['model']['architecture']}, weights hash "
             f"`{first['model']['hash']}`); task data hash `{task.get('data_hash')}`; evaluation split "
             f"**{split}**; seq_len {settings['seq_len']}; device {settings['device']}; main metric "
             f"`{main}` ({better} is better)", ""]
    budgets = sorted({r["budget"] for r in recs if r["method"] != "dense"}, reverse=True)
    dense = next((r for r in recs if r["method"] == "dense"), None)
    rows = []
    if dense is not None:
        rows.append(["dense", _num(dense["metrics"].get(main))] + ["" for _ in budgets] + [split])
    by_method: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    for r in recs:
        if r["method"] != "dense":
            by_method[r["method"]].setdefault(r["budget"], r)
    for method in sorted(by_method):
        cells = [_cell(by_method[method][b], main) if b in by_method[method] else "-" for b in budgets]
        rows.append([method, ""] + cells + [split])
    headers = ["method", "dense"] + [f"{b:g}" for b in budgets] + ["eval split"]
    lines += [tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
              f"Cells: `{main}` at each kept-FLOPs budget. {R.FLOPS_NOTE}.", ""]
    lines += _paper_table(recs)
    metrics = sorted({k for r in recs for k in r["metrics"]})
    ran = [r for r in recs if not R.failed(r)]  # failure records have no figures
    priced = sorted({r["flops"]["priced_seq_len"] for r in ran if r["flops"].get("priced_seq_len") not in
                     (None, settings["seq_len"])})
    n_lat = max((len(r["latency"].get("batches", [None])) for r in ran), default=1)
    lat_sizes = next((([b["batch_size"] for b in r["latency"]["batches"]]) for r in ran
                      if len(r["latency"].get("batches", [])) == n_lat), [lat.get("batch_size", "-")])
    detail = []
    for r in recs:
        if R.failed(r):
            blanks = (1 if priced else 0) + 1 + len(metrics) + n_lat + 4
            detail.append([r["method"], f"{r['budget']:g}", f"FAILED at {r['failure']['stage']}"]
                          + ["-"] * blanks + [str(r["seed"]), "-", split])
            continue
        size = r.get("size", {})
        detail.append([r["method"], f"{r['budget']:g}", _num(r["flops"].get("kept"))]
                      + ([_num(r["flops"].get("analytic_kept"))] if priced else [])
                      + [f"{r['params'] / 1e6:.2f}M"]
                      + [_num(r["metrics"].get(k)) for k in metrics]
                      + [speedup_cell(r["latency"], batch=i, flops_kept=r["flops"].get("kept")) for i in range(n_lat)]
                      + [_num(size.get("bits_per_weight")), _num(size.get("bytes", 0) / 1e6),
                         f"{size['compression_ratio']:.2f}x" if size.get("compression_ratio") else "-",
                         f"{r['prune']['time_s']:.1f}", str(r["seed"]), fidelity_cell(r), split])
    headers = ([f"method", "budget", f"FLOPs kept @{settings['seq_len']}"]
               + ([f"FLOPs kept @{'/'.join(map(str, priced))} (priced)"] if priced else []) + ["params"] + metrics
               + [f"speed-up b{b}" for b in lat_sizes]
               + ["bits/weight", "size MB", "ratio", "prune s", "seed", "vs authors' code", "eval split"])
    lines += [tabulate(detail, headers=headers, tablefmt="github", disable_numparse=True), "",
              f"{R.FLOPS_NOTE}; 'FLOPs kept @N' is at N tokens per sequence (priced: the length the budget "
              f"was priced at, --flops-seq-len). Speed-up bB: dense / pruned forward latency at batch B x "
              f"{lat.get('seq_len', '-')} tokens, median [quartiles] of the per-round ratios, dense and pruned "
              f"timed interleaved in one process ({lat.get('repeats', '-')} rounds after {lat.get('warmup', '-')} "
              f"warm-up passes, {settings['device']}); 'noise': above 1 / FLOPs kept, more than the removed "
              "FLOPs explain, so not reported as a result; 'unverified': timed before this protocol. "
              "vs authors' code: the settings that differ from the method authors' public code "
              "(as recorded by its stages). "
              f"{R.SIZE_NOTE}. prune s: what one prune at that budget alone costs; `harness compare` "
              "scores each method once and reuses the scores for its other budgets, and counts that "
              "score time in every row.", ""]
    lines += generation_table(recs)
    failures = [r for r in recs if R.failed(r)]
    if failures:
        lines += ["Failed runs (a re-run of the same command retries them):", ""]
        lines += [f"- `{r['method']}` @ {r['budget']:g}: {r['failure']['summary']}" for r in failures] + [""]
    if plot:
        lines += [f"![{task['name']} Pareto plot]({plot})", ""]
    return "\n".join(lines)


def generation_table(recs: list[dict[str, Any]]) -> list[str]:
    """Decoders: generation throughput (tokens/s of the pruned model and its speed-up over the dense
    one per batch size), KV-cache bytes per token, peak memory and parameters. Nothing when no
    record measured generation (encoders, records from before the measurement)."""
    from tabulate import tabulate

    gens = [r for r in recs if not R.failed(r) and (r.get("generation") or {}).get("batches")]
    if not gens:
        return []
    sizes = [b["batch_size"] for b in max((r["generation"]["batches"] for r in gens), key=len)]
    rows = []
    for r in gens:
        g = r["generation"]
        by_size = {b["batch_size"]: b for b in g["batches"]}
        cells = []
        for size in sizes:
            b = by_size.get(size)
            if b is None:
                cells += ["-", "-"]
                continue
            p = b["pruned"]
            cells.append(f"{p['tokens_per_s']:.4g} [{p['q25']:.4g}-{p['q75']:.4g}]")
            if r["method"] == "dense":
                cells.append("1")
            elif b.get("flag") == "noise":
                cells.append(f"noise ({b['speedup']:.2f}x > {b['bound']:.2f})")
            else:
                cells.append(f"{b['speedup']:.2f}x [{b['speedup_q25']:.2f}-{b['speedup_q75']:.2f}]")
        kv = (g.get("kv_cache_bytes_per_token") or {}).get("pruned")
        peak = (g.get("peak_memory") or {}).get("pruned") or {}
        rows.append([r["method"], "dense" if r["method"] == "dense" else f"{r['budget']:g}",
                     f"{g['params']['pruned'] / 1e6:.2f}M", "-" if kv is None else f"{kv / 1024:.1f}"]
                    + cells + ["-" if not peak.get("bytes") else f"{peak['bytes'] / 2**20:.1f}"])
    headers = (["method", "budget", "params", "KV KiB/token"]
               + [h for size in sizes for h in (f"tokens/s b{size}", f"speed-up b{size}")]
               + [f"peak MiB (b{max(sizes)})"])
    g = gens[0]["generation"]
    peak_how = ((g.get("peak_memory") or {}).get("pruned") or {}).get("measured_by", "-")
    return ["Generation (greedy decoding with the KV cache):", "",
            tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
            f"tokens/s: batch x {g['new_tokens']} generated tokens after a {g['prompt_len']}-token prompt per "
            f"second (prefill included), median [quartiles] over {g['rounds']} interleaved rounds, "
            f"{g['threads']} threads, {g['device']}; speed-up: median [quartiles] of the per-round paired ratios, "
            "'noise' above the physical bound max(1 / FLOPs kept, dense / pruned bytes read per step). KV KiB/token: "
            f"measured from the cache after the prompt. Peak: {peak_how}.", ""]


def _cell(rec: dict[str, Any], metric: str) -> str:
    return f"failed ({rec['failure']['stage']})" if R.failed(rec) else _num(rec["metrics"].get(metric))


def _paper_table(recs: list[dict[str, Any]]) -> list[str]:
    """For suites whose records name their columns (lm-eval zero-shot): the table of the
    LLM-pruning papers, one row per run, each task's column in the metric the papers report,
    their mean, parameters and KV-cache bytes per token. Nothing for other tasks."""
    from tabulate import tabulate

    columns = next((r["evaluation"].get("columns") for r in recs if (r.get("evaluation") or {}).get("columns")), None)
    if not columns:
        return []
    acc = [c for c in columns if not c["metric"].endswith("/perplexity")]
    ppl = [c for c in columns if c["metric"].endswith("/perplexity")]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    rows = []
    for r in recs:
        if R.failed(r):
            rows.append([r["method"], f"{r['budget']:g}", f"failed ({r['failure']['stage']})"]
                        + ["-"] * (3 + len(acc) + len(ppl)))
            continue
        m, ev = r["metrics"], r.get("evaluation", {})
        kv = ev.get("kv_cache_bytes_per_token")
        rows.append([r["method"], "dense" if r["method"] == "dense" else f"{r['budget']:g}", _num(r["flops"].get("kept")),
                     f"{r['params'] / 1e6:.1f}M", "-" if kv is None else f"{kv / 1024:.1f}"]
                    + [pct(m.get(c["metric"])) for c in acc] + [pct(m.get("mean_acc"))]
                    + [_num(m.get(c["metric"])) for c in ppl])
    headers = (["method", "budget", "FLOPs kept", "params", "KV KiB/token"] + [c["column"] for c in acc] + ["mean"]
               + [c["column"] for c in ppl])
    ev = recs[0].get("evaluation", {})
    docs = ev.get("documents") or {}
    limit = ev.get("limit")
    scope = (f"first {limit} documents per task (" + ", ".join(f"{k} {v}" for k, v in docs.items()) + ")"
             if limit else "every document of each task's evaluation split")
    for name, part in (ev.get("parts") or {}).items():  # a '+' suite: say how its perplexity was measured
        if "windows" in part:
            scope += (f"; {name}: protocol '{part.get('protocol')}', {part['windows']} windows of {part['seq_len']} "
                      f"tokens ({'the whole test split' if part.get('whole_split') else 'not the whole test split'})")
    names = ", ".join(f"{c['column']} = `{c['metric']}`" for c in acc)
    ppl_names = "; perplexities: " + ", ".join(f"{c['column']} = `{c['metric']}`" for c in ppl) if ppl else ""
    return [tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
            f"Zero-shot accuracy in % ({names}); mean = mean of the accuracy columns (acc_norm where the task "
            f"defines it, else acc){ppl_names}. Evaluated on the {scope}.", ""]


def suite_perplexities(recs: list[dict[str, Any]]) -> list[str]:
    """Perplexity metrics of the perplexity tasks in a '+' suite (e.g. ``wikitext2/perplexity``),
    which get a Pareto plot of their own next to the main metric's."""
    parts = next((r["evaluation"].get("parts") for r in recs if r.get("evaluation", {}).get("parts")), None) or {}
    return [f"{name}/perplexity" for name, info in sorted(parts.items()) if "windows" in info]


def pareto_png(recs: list[dict[str, Any]], metric: str | None = None) -> bytes:
    """Main metric (or ``metric``, a perplexity: lower is better) vs FLOPs kept, one line per
    method, the dense model as a star (PNG bytes)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = _sorted(recs)
    main = metric or _metric_name(recs)
    higher = recs[0]["task"].get("higher_is_better", True) if metric is None else False
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in recs:
        value = r["metrics"].get(main)
        if value is not None and r["method"] != "dense" and not R.failed(r):
            by_method[r["method"]].append((r["flops"]["kept"], value))
    for method in sorted(by_method):
        pts = sorted(by_method[method])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for r in recs:
        if r["method"] == "dense" and r["metrics"].get(main) is not None:
            ax.axhline(r["metrics"][main], color="black", linestyle=":", linewidth=1)
            ax.plot([1.0], [r["metrics"][main]], marker="*", markersize=12, color="black", linestyle="", label="dense")
    if not higher:
        ax.set_yscale("log")
    ax.set_xlabel("FLOPs kept (fvcore, fraction of dense)")
    ax.set_ylabel(f"{main} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(f"{recs[0]['task']['name']} · {R.model_tag(recs[0]['model']['spec'])}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def build(results: str | Path) -> Path:
    """Rewrite ``<results>/LEADERBOARD.md`` and ``<results>/plots/*.png`` from the records.

    Only files the leaderboard wrote are replaced or deleted: a ``LEADERBOARD.md`` that does not
    start with its heading is refused, and a plot is deleted only when the previous rebuild listed
    it in ``plots/.tshrink-plots.json`` (a user's own figures there are left alone)."""
    from tshrink.outputs import OutputError, write_bytes_atomic

    results = Path(results)
    board = results / BOARD
    if board.exists() and not board.read_bytes().startswith(HEADER.encode()):
        raise OutputError(f"{board} was not written by `harness leaderboard` (it does not start with "
                          f"{HEADER!r}); move it away or give another --results directory")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in R.load_records(results):
        groups[group_slug(rec)].append(rec)
    parts = [HEADER, "",
             f"Rebuilt by `harness leaderboard` from the run records under `{R.RUNS}/` alone (do not edit by hand). "
             f"One section per task, model and settings.", ""]
    plots = results / PLOTS
    listed = plots / PLOT_LIST
    before = set(json.loads(listed.read_text())) if listed.is_file() else set()
    written = []
    for slug in sorted(groups):
        plot = f"{PLOTS}/{slug}.png"
        write_bytes_atomic(results / plot, pareto_png(groups[slug]))
        written.append(f"{slug}.png")
        parts.append(render_group(groups[slug], plot=plot))
        for metric in suite_perplexities(groups[slug]):  # a '+' suite: its perplexity gets a plot too
            extra = f"{PLOTS}/{slug}-{R.slug(metric.split('/')[0])}-ppl.png"
            write_bytes_atomic(results / extra, pareto_png(groups[slug], metric))
            written.append(extra.split("/", 1)[1])
            parts.append(f"![{metric} Pareto plot]({extra})\n")
    if not groups:
        parts += ["(no records yet: run `harness compare`)", ""]
    for stale in sorted(before - set(written)):
        if "/" not in stale and stale.endswith(".png"):
            (plots / stale).unlink(missing_ok=True)
    if written or listed.exists():
        write_bytes_atomic(listed, (json.dumps(written, indent=1) + "\n").encode())
    write_bytes_atomic(board, "\n".join(parts).rstrip("\n").encode() + b"\n")
    return board
