"""Pruning time of the Fisher-mask method (Kwon et al. 2022 report < 3 min for BERT-base on one GPU).

Two modes:

* default, ``--shape minilm --device cpu``: the packaged MiniLM-L6 (pretrained BERT encoder, NOT
  fine-tuned on any task) with a freshly initialised 2-class head (seeded), calibrated on
  ``--examples`` SST-2 train sentences with their labels (the paper's 2,048 by default), padded
  per batch to the longest sentence (as the public code's collator does). Accuracy means nothing
  here (the head is random); this measures time only.
* ``--shape bert-base --device cuda``: a BERT-base-shaped classifier (12 layers, hidden 768, 12
  heads, 3,072 neurons) with RANDOM weights, on the same SST-2 sentences tokenised with the MiniLM
  tokenizer (the bert-base-uncased vocabulary). Target: <= 60 s per prune (paper: < 3 min).

Prints the per-stage times of each method (``fisher-search``, ``fisher-rearrange``, ``fisher``:
every method recomputes the gradients) and writes ``results/benchmarks/fisher_timing_<shape>_
<device>.json``. Run from the repository root::

    python benchmarks/fisher_timing.py                                   # CPU, MiniLM, 2,048 examples
    python benchmarks/fisher_timing.py --device cuda --shape bert-base   # GPU
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

from tshrink.calibration import CalibrationData
from tshrink.checkpoint import write_json_atomic
from tshrink.models import load_model
from tshrink.pipeline import prune

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fisher-search", "fisher-rearrange", "fisher")


def sst2_batches(tokenizer, n: int, batch_size: int, max_length: int, data_dir: str, seed: int) -> CalibrationData:
    from tshrink_harness.tasks.glue import encode_glue, load_glue

    examples = load_glue("sst2", "train", data_dir=data_dir)
    pick = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    chosen = [examples[i] for i in pick]
    batches = [encode_glue(chosen[s:s + batch_size], tokenizer, max_length=max_length, padding="longest")
               for s in range(0, len(chosen), batch_size)]
    return CalibrationData([dict(b) for b in batches], source=f"SST-2 train ({n} random examples, seed {seed})",
                           meta={"kind": "encoder", "max_length": max_length})


def build(shape: str, seed: int):
    """(model, tokenizer, note) for the requested shape, classifier head seeded."""
    torch.manual_seed(seed)
    model, tok = load_model("minilm", head="sequence-classification", num_labels=2)
    if shape == "minilm":
        return model, tok, "MiniLM-L6 pretrained encoder (not fine-tuned) + freshly initialised 2-class head"
    if shape == "bert-base":
        import transformers as tf

        cfg = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            vocab_size=model.config.vocab_size, num_labels=2)
        torch.manual_seed(seed)
        return tf.BertForSequenceClassification(cfg).eval(), tok, "BERT-base shape, random weights"
    raise ValueError(f"--shape {shape!r} is not one of 'minilm', 'bert-base'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="minilm", choices=("minilm", "bert-base"))
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("TSHRINK_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, note = build(args.shape, args.seed)
    calib = sst2_batches(tok, args.examples, args.batch_size, args.max_length, args.data_dir, args.seed)
    print(f"{note}; {calib.n_examples} examples in {len(calib.batches)} batches, {calib.n_tokens} tokens, "
          f"longest {calib.seq_len}; device {args.device}, torch threads {torch.get_num_threads()}")
    runs = []
    for method in filter(None, args.methods.split(",")):
        fresh = copy.deepcopy(model)  # the same dense model for every method
        start = time.perf_counter()
        result = prune(fresh, method, args.budget, calib=calib, device=args.device, seed=args.seed)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        rep = result.report
        runs.append({"method": method, "wall_s": wall, "timings_s": rep["timings_s"], "flops_kept": rep["flops_kept"],
                     "stages": {k: {kk: vv for kk, vv in v.items() if kk != "per_sublayer"}
                                for k, v in rep["stages"].items()}})
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in rep["timings_s"].items())
        print(f"{method:18s} total {wall:7.1f} s  ({stages})  flops kept {rep['flops_kept']:.3f}")
        del fresh
    name = f"fisher_timing_{args.shape}_{args.device.replace(':', '')}.json"
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {
        "benchmark": "fisher_timing", "note": note, "shape": args.shape, "device": args.device,
        "host": platform.node(), "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "calibration": calib.describe(), "budget": args.budget, "batch_size": args.batch_size,
        "paper_reference": "Kwon et al. 2022: < 3 min for BERT-base on one GPU (2,048 examples)",
        "runs": runs, "command": "python benchmarks/fisher_timing.py " + " ".join(sys.argv[1:]),
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
