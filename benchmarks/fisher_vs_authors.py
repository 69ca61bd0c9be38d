"""Kwon et al.'s own code beside the `fisher` plugin, on the same fine-tuned model.

Two halves, because the authors' code needs a transformers 4 (it passes ``head_mask``,
which transformers 5 removed) and the project needs transformers 5:

``authors``  runs in a virtual environment of its own, beside a checkout of the public code
            (``git clone https://github.com/WoosukKwon/retraining-free-pruning``). It imports
            that code unchanged and calls its ``main()``; only what cannot run here is swapped,
            at run time, never in their files:
              - data: ``datasets.load_dataset("glue", task)`` -> the same GLUE TSV files the
                harness reads (``harness/tasks/glue.py``, loaded by path), same columns;
              - metric: ``datasets.load_metric("glue", task)`` -> the harness' GLUE scores
                (``harness/metrics/glue_metric/glue_scores.py``), every key recorded;
              - device: ``.cuda()`` / ``.to("cuda")`` stay on the CPU, and ``cupy`` /
                ``cupyx...lsmr`` are NumPy / SciPy's ``lsmr`` (same signature and result).
            Everything else (2,048 examples with replacement, batches of 32, MACs at the dev
            set's average length, the search, rearrangement and the least-squares rescaling
            against the sqrt(constraint) teacher, [CLS]-only last layer) is their code.

``compare``  (the project's environment) runs both for every task x constraint x seed:
            the authors' half through ``--authors-python``, the plugin as
            ``harness compare --methods fisher --flops C --flops-seq-len avg`` (its published
            defaults, see ``plugins/fisher/published.py``), and writes
            ``results/benchmarks/fisher_vs_authors-<task>.{json,md}``: the metric of each, the
            kept heads / neurons, and the MACs both selections keep under the authors' own
            MAC formula (``efficiency/mac.py``: per head 4*s*d*h + 2*s^2*h, per neuron 2*s*d).

Set-up of the authors' environment (CPU)::

    python -m venv /tmp/kwon-venv
    /tmp/kwon-venv/bin/pip install torch==2.13.0 transformers==4.40.2 datasets==2.19.1 \
        "numpy<2" "pyarrow<17" scipy scikit-learn tqdm

Run::

    python benchmarks/fisher_vs_authors.py compare --repo /tmp/retraining-free-pruning \
        --authors-python /tmp/kwon-venv/bin/python --task mrpc --model /work/ft/minilm-mrpc \
        --constraints 0.6,0.5,0.4 --seeds 0,1,2 --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the authors' task names -> the harness' (the same for these four)
TASKS = {"mrpc": "mrpc", "stsb": "stsb", "sst2": "sst2", "rte": "rte"}
# their column names for datasets.load_dataset("glue", task)
COLUMNS = {"sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"),
           "rte": ("sentence1", "sentence2")}


def _load_by_path(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- authors' half
def _install_cpu_shims() -> None:
    """``.cuda()`` / ``.to("cuda")`` stay on the CPU; ``cupy`` is NumPy, its lsmr SciPy's."""
    import numpy as np
    import scipy.sparse.linalg as sla
    import torch

    def on_cpu(x):
        if isinstance(x, str) and x.startswith("cuda"):
            return "cpu"
        if isinstance(x, torch.device) and x.type == "cuda":
            return torch.device("cpu")
        return x

    to = torch.Tensor.to
    torch.Tensor.to = lambda self, *a, **k: to(self, *(on_cpu(x) for x in a),
                                               **{n: on_cpu(v) for n, v in k.items()})
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self

    cupy = types.ModuleType("cupy")
    cupy.asarray, cupy.asnumpy = np.asarray, np.asarray
    linalg = types.ModuleType("cupyx.scipy.sparse.linalg")

    def lsmr(A, b, **kw):  # cupyx's lsmr keeps the input dtype; SciPy's returns float64
        out = sla.lsmr(A, b, **kw)
        return (out[0].astype(A.dtype),) + tuple(out[1:])

    linalg.lsmr = lsmr
    for name, mod in {"cupy": cupy, "cupyx": types.ModuleType("cupyx"),
                      "cupyx.scipy": types.ModuleType("cupyx.scipy"),
                      "cupyx.scipy.sparse": types.ModuleType("cupyx.scipy.sparse"),
                      "cupyx.scipy.sparse.linalg": linalg}.items():
        sys.modules[name] = mod


def _local_glue(data_dir: str):
    """``load_dataset("glue", task)`` from the harness' reader of the local TSV files."""
    import datasets

    glue = _load_by_path("_tshrink_glue_reader", ROOT / "harness" / "tasks" / "glue.py")

    def load_dataset(name, task, *a, **k):
        assert name == "glue", name
        a_col, b_col = COLUMNS[task]
        splits = {}
        for split in ("train", "validation"):
            rows = glue.load_glue(task, split, data_dir)
            cols = {a_col: [r["text_a"] for r in rows], "label": [r["label"] for r in rows],
                    "idx": [r["idx"] for r in rows]}
            if b_col:
                cols[b_col] = [r["text_b"] for r in rows]
            splits[split] = datasets.Dataset.from_dict(cols)
        return datasets.DatasetDict(splits)

    return load_dataset


class _Metric:
    """``load_metric("glue", task)`` with the harness' scores; keeps every key it computed."""
    last: dict = {}

    def __init__(self, task: str):
        self.task, self.preds, self.refs = task, [], []
        self.scores = _load_by_path("_tshrink_glue_scores",
                                    ROOT / "harness" / "metrics" / "glue_metric" / "glue_scores.py")

    def add_batch(self, predictions, references):
        self.preds += predictions.reshape(-1).tolist()
        self.refs += references.reshape(-1).tolist()

    def compute(self):
        out = {k: float(v) for k, v in self.scores.glue_scores(self.task, self.preds, self.refs).items()}
        _Metric.last = out
        return out


def run_authors(args: argparse.Namespace) -> None:
    repo = os.path.abspath(args.repo)
    sys.path.insert(0, repo)
    _install_cpu_shims()
    import torch

    torch.set_num_threads(args.threads)
    import dataset.glue as their_glue
    import evaluate.glue as their_eval
    import main as their_main
    from efficiency.mac import compute_mask_mac

    their_glue.load_dataset = _local_glue(args.data_dir)
    their_eval.load_metric = lambda name, task: _Metric(task)
    out_dir = tempfile.mkdtemp(prefix="kwon-")
    sys.argv = ["main.py", "--model_name", args.model, "--ckpt_dir", args.model, "--task_name", args.task,
                "--constraint", str(args.constraint), "--seed", str(args.seed), "--output_dir", out_dir,
                "--num_samples", str(args.num_samples)]
    start = time.perf_counter()
    their_main.main()
    elapsed = time.perf_counter() - start
    head = torch.load(os.path.join(out_dir, "head_mask.pt"))
    neuron = torch.load(os.path.join(out_dir, "neuron_mask.pt"))
    seq_len = their_glue.avg_seq_length(args.task)
    hidden = their_main.AutoConfig.from_pretrained(args.model).hidden_size
    pruned, orig = compute_mask_mac(head, neuron, seq_len, hidden)
    record = {"metrics": _Metric.last, "heads": [int((h != 0).sum()) for h in head],
              "neurons": [int((n != 0).sum()) for n in neuron], "macs_kept": float(pruned / orig),
              "seq_len": seq_len, "time_s": elapsed, "repo": repo, "git": _git_head(repo)}
    Path(args.json).write_text(json.dumps(record, indent=1))


def _git_head(repo: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# --------------------------------------------------------------------------- comparison
def their_macs(heads: list[int], neurons: list[int], n_heads: int, inter: int, hidden: int, seq: float) -> float:
    """The authors' MAC formula (efficiency/mac.py), kept / dense, for per-layer widths."""
    h = hidden // n_heads
    per_head = 3 * seq * hidden * h + 2 * seq * seq * h + seq * h * hidden
    per_neuron = 2 * seq * hidden
    kept = sum(a * per_head + b * per_neuron for a, b in zip(heads, neurons))
    return kept / (len(heads) * (n_heads * per_head + inter * per_neuron))


def _plugin_run(args, constraint: float, seed: int, results: Path) -> dict:
    cmd = [sys.executable, "-m", "tshrink_harness.cli", "compare", "--methods", "fisher", "--task", args.task,
           "--model", args.model, "--flops", str(constraint), "--seed", str(seed), "--flops-seq-len", "avg",
           "--data-dir", args.data_dir, "--results", str(results), "--no-leaderboard", "--latency-repeats", "1", "--latency-min-time", "0.05"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    recs = [json.loads(p.read_text()) for p in results.rglob("fisher@*.json")]
    recs = [r for r in recs if r.get("seed") == seed and abs(float(r["budget"]) - constraint) < 1e-9
            and r.get("status") != "failed"]
    if not recs:
        raise SystemExit(f"no fisher record for seed {seed} at {constraint} under {results}")
    rec = recs[0]
    widths = rec["prune"]["widths"]
    return {"metrics": rec["metrics"], "heads": widths["heads"], "neurons": widths["neurons"],
            "flops_kept": rec["flops"].get("kept") if isinstance(rec.get("flops"), dict) else rec.get("flops"),
            "time_s": elapsed, "command": " ".join(cmd), "fidelity": rec["prune"].get("stages", {}).get("fidelity")}


def compare(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    constraints = [float(c) for c in args.constraints.split(",")]
    out = ROOT / "results" / "benchmarks" / f"fisher_vs_authors-{args.task}.json"
    data = json.loads(out.read_text()) if out.exists() and args.resume else {"runs": []}
    data.update({"task": args.task, "model": args.model, "command": "python " + " ".join(sys.argv),
                 "authors_repo": args.repo, "authors_python": args.authors_python})
    done = {(r["side"], r["constraint"], r["seed"]) for r in data["runs"]}
    results = Path(args.work or tempfile.mkdtemp(prefix="fisher-vs-authors-"))
    for c in constraints:
        for s in seeds:
            for side in args.sides.split(","):
                if (side, c, s) in done:
                    continue
                if side == "authors":
                    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                        path = f.name
                    cmd = [args.authors_python, __file__, "authors", "--repo", args.repo, "--model", args.model,
                           "--task", args.task, "--constraint", str(c), "--seed", str(s), "--data-dir",
                           os.path.abspath(args.data_dir), "--json", path, "--threads", str(args.threads)]
                    subprocess.run(cmd, check=True, cwd=tempfile.gettempdir())
                    run = json.loads(Path(path).read_text())
                    os.unlink(path)
                else:
                    run = _plugin_run(args, c, s, results / f"{c}-{s}")
                run["macs_kept_authors_formula"] = their_macs(run["heads"], run["neurons"], cfg.num_attention_heads,
                                                              cfg.intermediate_size, cfg.hidden_size,
                                                              AVG_LEN[args.task])
                data["runs"].append({"side": side, "constraint": c, "seed": s, **run})
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(data, indent=1))
                out.with_suffix(".md").write_text(table(data))
                print(f"{side} {c} seed {s}: {run['metrics']}", flush=True)
    out.with_suffix(".md").write_text(table(data))


# the authors' dev-set average lengths (dataset/glue.py avg_seq_length), for their MAC formula
AVG_LEN = {"stsb": 31.47, "mrpc": 53.24, "rte": 64.59, "sst2": 25.16}
MAIN = {"mrpc": ("f1", "accuracy"), "stsb": ("spearmanr", "pearson"), "sst2": ("accuracy",), "rte": ("accuracy",)}


def _metric(run: dict, task: str, key: str) -> float | None:
    m = run["metrics"]
    for k in (key, f"{task}/{key}"):
        if k in m:
            return 100 * float(m[k])
    return None


def table(data: dict) -> str:
    task = data["task"]
    keys = MAIN[task]
    lines = [f"# Fisher (Kwon et al.): the authors' code vs the `fisher` plugin, {task} (x 100)", "",
             f"Model `{data['model']}`; authors' code at commit `{next((r.get('git') for r in data['runs'] if r.get('git')), '?')}`"
             " run on the CPU with only its data loading, metric and device swapped (see "
             "benchmarks/fisher_vs_authors.py); cells: mean, min..max over seeds (n).", "",
             f"Command: `{data['command']}`", ""]
    head = ["MACs kept (constraint)"] + [f"{side} {k}" for k in keys for side in ("authors", "plugin")] + [
        "MACs kept, authors' formula (authors / plugin)", "heads kept (authors / plugin)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted({r["constraint"] for r in data["runs"]}, reverse=True):
        row = [f"{c:.0%}"]
        by = {side: [r for r in data["runs"] if r["constraint"] == c and r["side"] == side]
              for side in ("authors", "plugin")}
        for k in keys:
            for side in ("authors", "plugin"):
                vals = [v for v in (_metric(r, task, k) for r in by[side]) if v is not None]
                row.append(f"{sum(vals) / len(vals):.1f}, {min(vals):.1f}..{max(vals):.1f} ({len(vals)})" if vals else "-")
        macs = [sum(r["macs_kept_authors_formula"] for r in by[s]) / len(by[s]) if by[s] else float("nan")
                for s in ("authors", "plugin")]
        heads = [sum(sum(r["heads"]) for r in by[s]) / len(by[s]) if by[s] else float("nan") for s in ("authors", "plugin")]
        row += [f"{macs[0]:.3f} / {macs[1]:.3f}", f"{heads[0]:.0f} / {heads[1]:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("authors", help="run the authors' code once (in its own environment)")
    a.add_argument("--repo", required=True)
    a.add_argument("--model", required=True)
    a.add_argument("--task", required=True, choices=sorted(TASKS))
    a.add_argument("--constraint", type=float, required=True)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--data-dir", required=True)
    a.add_argument("--json", required=True)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--num-samples", type=int, default=2048, help="their --num_samples (2048 as published)")
    c = sub.add_parser("compare", help="both sides for every constraint and seed; writes the table")
    c.add_argument("--repo", required=True)
    c.add_argument("--authors-python", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--task", required=True, choices=sorted(TASKS))
    c.add_argument("--constraints", default="0.6,0.5,0.4")
    c.add_argument("--seeds", default="0,1,2")
    c.add_argument("--sides", default="authors,plugin")
    c.add_argument("--data-dir", default=os.environ.get("TSHRINK_DATA_DIR", "../shared/data"))
    c.add_argument("--work", default=None, help="folder for the plugin's records (default: a temporary one)")
    c.add_argument("--resume", action="store_true", help="keep the runs already in the JSON file")
    c.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.mode == "authors":
        run_authors(args)
    else:
        if not Path(args.repo, "main.py").is_file():
            raise SystemExit(f"--repo {args.repo}: no main.py; expected a checkout of WoosukKwon/retraining-free-pruning")
        if not Path(args.authors_python).is_file():
            raise SystemExit(f"--authors-python {args.authors_python}: not a file; expected the python of a venv "
                             "with transformers 4 (see this file's docstring)")
        compare(args)


if __name__ == "__main__":
    main()
