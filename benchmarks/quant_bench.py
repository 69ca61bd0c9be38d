"""Quantization benchmark: bits/weight, size on disk, quality, time; k-means vs BS-Flex speed.

    python benchmarks/quant_bench.py --model minilm             # embedding cosine vs dense
    python benchmarks/quant_bench.py --model smollm2 --configs kmeans4,binarize,bs-flex0
                                                                 # WikiText-2 perplexity subset

Every configuration compresses a fresh copy of the dense model with ``tshrink.pipeline.prune``
(scope: every Linear of the transformer layers), saves it with ``save_pruned`` and measures
the compact size from the saved files (``compressed_size_bytes``: compressed.safetensors +
the float tensors it does not replace). Quality: relative weight error over the scope, and
for MiniLM the mean cosine of mean-pooled embeddings with the dense model's on held-out
sentences, for SmolLM2 the perplexity on the first windows of WikiText-2 test (or the
built-in evaluation text when no data directory is found). The timing part quantizes every
weight in scope with 1-bit k-means (Lloyd, per row) and with the one-shot BS-Flex
binarization (exact split by sort + prefix sums, per row) in the same process.
Writes ``results/benchmarks/quant_<model>.json`` atomically.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tshrink.arch.families import get_adapter
from tshrink.calibration import batches_from_texts, lm_batches_from_text, model_inputs
from tshrink.textdata import builtin_sentences, builtin_text

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "kmeans8": ("kmeans", {"quant_bits": 8}),
    "kmeans4": ("kmeans", {"quant_bits": 4}),
    "kmeans4-layer": ("kmeans", {"quant_bits": 4, "quant_granularity": "layer"}),
    "kmeans2": ("kmeans", {"quant_bits": 2}),
    "kmeans1": ("kmeans", {"quant_bits": 1}),
    "binarize": ("binarize", {}),
    "bs-flex0": ("bs-flex", {"quant_flex_steps": 0}),
    "bs-flex": ("bs-flex", {}),  # default recovery steps and learning rate
    "bs-flex-lr1e-3": ("bs-flex", {"quant_lr": 1e-3}),
    "binarize-retrain": ("binarize", {"quant_retrain_steps": 16}),  # fixed assignments, trained centroids
    "imp-30-50": ("imp", {"quant_imp_schedule": "30,50"}),
    "imp-50-80": ("imp", {"quant_imp_schedule": "50,80"}),
    "imp-30-50-layer": ("imp", {"quant_imp_schedule": "30,50", "quant_imp_ranking": "layer"}),
}


def _data_dir(given: str | None) -> Path | None:
    """--data-dir, else $TSHRINK_DATA_DIR, else ../shared/data next to the repository, else None."""
    for value in (given, os.environ.get("TSHRINK_DATA_DIR"), Path(__file__).resolve().parents[1] / ".." / "shared" / "data"):
        if value and Path(value).is_dir():
            return Path(value).resolve()
    return None


@torch.no_grad()
def _pooled(model: torch.nn.Module, batches: Any) -> list[torch.Tensor]:
    """Mean-pooled last hidden states per batch, (batch, hidden) each."""
    out = []
    for b in batches.batches:
        mask = b["attention_mask"]
        h = model(**model_inputs(b)).last_hidden_state  # (batch, seq, hidden)
        out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return out


def _calibration(tok: Any, kind: str, samples: int, seq: int, data: Path | None) -> Any:
    if kind == "encoder":
        return batches_from_texts(tok, builtin_sentences("calibration")[:samples], seq_len=seq,
                                  source="python-docs:calibration")
    file = data / "wikitext-2-tokens" / "wiki.valid.tokens" if data is not None else None
    if file is not None and file.exists():
        text, source = file.read_text(encoding="utf-8"), "wikitext-2-tokens/wiki.valid.tokens"
    else:
        text, source = builtin_text("calibration"), "python-docs:calibration"
    return lm_batches_from_text(tok, text, seq_len=seq, n_sequences=samples, source=source)


def _evaluator(model: torch.nn.Module, tok: Any, kind: str, data: Path | None, args: argparse.Namespace):
    """(name, fn(model) -> value, description) for the model kind."""
    if kind == "encoder":
        evalset = batches_from_texts(tok, builtin_sentences("evaluation")[:args.eval_samples], seq_len=128,
                                     source="python-docs:evaluation")
        ref = _pooled(model, evalset)

        def cosine(net: torch.nn.Module) -> float:
            got = _pooled(net, evalset)
            return torch.cat([torch.nn.functional.cosine_similarity(a, b, dim=-1) for a, b in zip(got, ref)]).mean().item()

        return "embedding_cosine", cosine, f"{evalset.n_examples} python-docs evaluation snippets, 128 tokens"
    from tshrink_harness.tasks.wikitext import perplexity, wikitext2_test_text

    if data is not None and (data / "wikitext-2-raw").is_dir():
        text, source = wikitext2_test_text(data), "WikiText-2 raw test"
    else:
        text, source = builtin_text("evaluation"), "python-docs evaluation text"

    def ppl(net: torch.nn.Module) -> float:
        return perplexity(net, tok, text, seq_len=args.seq_len, max_windows=args.eval_windows).ppl

    return "perplexity", ppl, f"{source}, first {args.eval_windows} windows of {args.seq_len} tokens"


def _timing(model: torch.nn.Module, repeats: int) -> dict[str, Any]:
    from tshrink_plugins.quant.binarize import binarize_fixed
    from tshrink_plugins.quant.kmeans import kmeans_quantize
    from tshrink_plugins.quant.scope import scope_linears

    weights = [lin.weight.detach() for _, lin in scope_linears(model, "all")]

    def run(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for W in weights:
                fn(W)
            best = min(best, time.perf_counter() - t)
        return best

    km = run(lambda W: kmeans_quantize(W, 1, granularity="row"))
    bs = run(lambda W: binarize_fixed(W))
    err_km = sum(float(((kmeans_quantize(W, 1, granularity="row").dequantize() - W) ** 2).sum()) for W in weights)
    err_bs = sum(float(((binarize_fixed(W).dequantize() - W) ** 2).sum()) for W in weights)
    return {"weights": len(weights), "params": sum(W.numel() for W in weights), "repeats": repeats,
            "kmeans_1bit_row_s": km, "bsflex_one_shot_row_s": bs, "speedup_bsflex_over_kmeans": km / bs,
            "sse_kmeans_1bit": err_km, "sse_bsflex_one_shot": err_bs,
            "note": "best of `repeats` wall times over all scope weights; k-means: Lloyd from linear init (<= 100 "
                    "iterations); BS-Flex one-shot: exact optimal split (sort + prefix sums)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=128, help="MiniLM evaluation snippets")
    parser.add_argument("--eval-windows", type=int, default=8, help="SmolLM2 perplexity windows")
    parser.add_argument("--timing-repeats", type=int, default=3, help="0 skips the k-means vs BS-Flex timing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tshrink.checkpoint import save_pruned, write_json_atomic
    from tshrink.models import load_model
    from tshrink.pipeline import prune
    from tshrink_plugins.quant.apply import size_report

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    data = _data_dir(args.data_dir)
    dense, tok = load_model(args.model)
    kind = "causal" if get_adapter(dense).causal else "encoder"
    seq = args.seq_len if kind == "causal" else 128
    calib = _calibration(tok, kind, args.calib_samples or (8 if kind == "causal" else 64), seq, data)
    metric, evaluate, eval_desc = _evaluator(dense, tok, kind, data, args)
    out_file = Path(args.out or Path(__file__).resolve().parents[1] / "results" / "benchmarks" / f"quant_{args.model}.json")
    record: dict[str, Any] = {
        "command": "python benchmarks/quant_bench.py " + " ".join(sys.argv[1:]),
        "model": args.model, "kind": kind, "metric": metric, "evaluation": eval_desc,
        "calibration": calib.describe(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "torch": torch.__version__, "runs": {},
    }
    if args.resume and out_file.exists():
        old = json.loads(out_file.read_text())
        if old.get("model") == args.model and old.get("calibration") == record["calibration"]:
            record["runs"] = old["runs"]
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(dense, Path(tmp) / "dense")
        record["dense"] = {metric: evaluate(dense), **size_report(Path(tmp) / "dense")}
        print(f"dense: {metric}={record['dense'][metric]:.4f} float_bytes={record['dense']['float_bytes']}", flush=True)
        for name in names:
            if name in record["runs"]:
                print(f"{name}: kept from {out_file}", flush=True)
                continue
            method, opts = CONFIGS[name]
            net = copy.deepcopy(dense)
            t = time.perf_counter()
            res = prune(net, method, 1.0, calib=calib, options=opts, seed=0)
            wall = time.perf_counter() - t
            path = save_pruned(net, Path(tmp) / name, compressed=res.compressed)
            rep = res.report["transforms"][method]
            sizes = size_report(path)
            row = {"method": method, "options": opts, metric: evaluate(net), "transform_s": wall,
                   "bits_per_weight": rep["bits_per_weight"], "quantized_params": rep["quantized_params"],
                   "packed_bytes": rep["packed_bytes"], "relative_weight_error": rep["relative_weight_error"],
                   "size_bytes": sizes["size_bytes"], "compressed_file_bytes": sizes["compressed_file_bytes"],
                   "ratio_vs_dense_float": record["dense"]["float_bytes"] / sizes["size_bytes"],
                   **{k: rep[k] for k in ("recovery", "moved_fraction", "sparsity") if k in rep}}
            record["runs"][name] = row
            print(f"{name:14s} bits/w={row['bits_per_weight']:.3f} size={row['size_bytes'] / 1e6:.2f}MB "
                  f"ratio={row['ratio_vs_dense_float']:.2f}x relerr={row['relative_weight_error']:.4f} "
                  f"{metric}={row[metric]:.4f} time={wall:.1f}s", flush=True)
            write_json_atomic(out_file, record)
            del net
    if args.timing_repeats > 0:
        record["timing"] = _timing(dense, args.timing_repeats)
        print("timing:", {k: v for k, v in record["timing"].items() if k != "note"}, flush=True)
    write_json_atomic(out_file, record)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
