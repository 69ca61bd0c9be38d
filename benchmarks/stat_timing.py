"""STAT pruning time and peak memory.

Default: the packaged MiniLM-L6 (``minilm``, pretrained weights) on the CPU with 512
calibration sentences (SST-2 training sentences, a seeded random sample), padded per batch
of 64 to the longest sentence after sorting by length (``--fixed-padding`` pads every
sentence to ``--seq-len`` instead). Target: <= 60 s on a CPU.

GPU shapes with random weights (ready to run; not run in the development session, which
had no GPU):

    python benchmarks/stat_timing.py --device cuda --shape bert-base   # target <= 60 s
    python benchmarks/stat_timing.py --device cuda --shape llama-7b    # target <= 30 min, <= 40 GiB

``bert-base``: 12 layers, hidden 768, 12 heads, 3072 neurons, float32, 512 random-token
sequences of 128. ``llama-7b``: Llama-2-7B shapes (32 layers, hidden 4096, 32 heads,
11008 neurons), bfloat16 weights, 256 random-token sequences of 512 (hidden states kept on
the CPU by the layer stream; statistics and decompositions in float64 on the GPU).

Peak memory: CPU = peak resident set size of the process during pruning, sampled every
20 ms (and the value before pruning); GPU = ``torch.cuda.max_memory_allocated`` during
pruning. Writes ``results/benchmarks/stat_timing-<shape>-<device>.json`` (atomic).
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("minilm", "bert-base", "llama-7b")


class RssPeak:
    """Peak resident set size of this process while open (sampling thread)."""

    def __init__(self, every_s: float = 0.02) -> None:
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every_s, 0, threading.Event()
        self.start = self.proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self) -> "RssPeak":
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def minilm_calibration(tokenizer: Any, n: int, seq_len: int, data_dir: Path, seed: int, fixed: bool) -> Any:
    from tshrink.calibration import CalibrationData

    lines = (data_dir / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = random.Random(seed).sample([ln.split("\t")[0] for ln in lines], n)
    if not fixed:
        texts.sort(key=lambda t: len(tokenizer(t)["input_ids"]))
    batches = []
    for i in range(0, n, 64):
        enc = tokenizer(texts[i:i + 64], truncation=True, max_length=seq_len,
                        padding="max_length" if fixed else "longest", return_tensors="pt")
        batches.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return CalibrationData(batches, source=f"SST-2 train, {n} random sentences (seed {seed})",
                           meta={"padding": "fixed" if fixed else "per batch, length-sorted"})


def random_model(shape: str, device: str, shrink: int = 1) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised model of the given shape, built directly on ``device``
    (``shrink`` > 1 divides widths, depth and calibration size: a quick smoke test only)."""
    import transformers as tf

    from tshrink.calibration import CalibrationData

    g = torch.Generator().manual_seed(0)
    k = shrink
    if shape == "bert-base":
        cfg = tf.BertConfig(hidden_size=768 // k, num_hidden_layers=max(1, 12 // k), num_attention_heads=12,
                            intermediate_size=3072 // k)
        with torch.device(device):
            model = tf.AutoModel.from_config(cfg)
        n, seq, bs = 512 // k, 128, 32
    else:
        cfg = tf.LlamaConfig(hidden_size=4096 // k, num_hidden_layers=max(1, 32 // k), num_attention_heads=32,
                             num_key_value_heads=32, intermediate_size=11008 // k, vocab_size=32000,
                             max_position_embeddings=4096)
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        n, seq, bs = 256 // k, 512, 8
    model.eval()
    batches = []
    for _ in range(0, n, bs):
        ids = torch.randint(3, cfg.vocab_size, (bs, seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return model, CalibrationData(batches, source=f"random tokens {n} x {seq}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="minilm", choices=SHAPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="stat")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--calib-samples", type=int, default=512, help="minilm only")
    p.add_argument("--seq-len", type=int, default=128, help="minilm: truncation length (and FLOPs seq_len)")
    p.add_argument("--fixed-padding", action="store_true", help="minilm: pad every sentence to --seq-len")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--opt", action="append", default=[], help="method option name=value (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--shrink", type=int, default=1, help="random shapes: divide sizes by this (smoke test)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tshrink.checkpoint import write_json_atomic
    from tshrink.pipeline import prune

    options = dict(o.split("=", 1) for o in args.opt)
    if args.shape == "minilm":
        from tshrink.models import load_model

        model, tok = load_model("minilm")
        model.to(args.device)
        calib = minilm_calibration(tok, args.calib_samples, args.seq_len, Path(args.data_dir), 0, args.fixed_padding)
        seq_len = args.seq_len
    else:
        model, calib = random_model(args.shape, args.device, args.shrink)
        seq_len = calib.seq_len
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before_gpu = torch.cuda.memory_allocated()
    with RssPeak() as rss:
        t = time.perf_counter()
        res = prune(model, args.method, args.budget, calib=calib, seq_len=seq_len, options=options,
                    device=args.device)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    rec: dict[str, Any] = {
        "shape": args.shape, "device": args.device, "method": args.method, "budget": args.budget,
        "options": res.report["options"], "calibration": calib.describe(), "prune_time_s": wall,
        "stage_times_s": res.report["timings_s"], "flops_kept": res.report["flops_kept"],
        "rss_before_gib": rss.start / 2**30, "rss_peak_gib": rss.peak / 2**30,
        "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/stat_timing.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if cuda:
        rec["gpu_before_gib"] = before_gpu / 2**30
        rec["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["gpu"] = torch.cuda.get_device_name()
    name = f"stat_timing-{args.shape}-{args.device.split(':')[0]}{f'-shrink{args.shrink}' if args.shrink > 1 else ''}.json"
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / name
    write_json_atomic(out, rec)
    print(f"{args.method} on {args.shape} ({args.device}), {calib.n_examples} calibration examples / "
          f"{calib.n_tokens} tokens: {wall:.1f} s; stages "
          f"{dict((k, round(v, 1)) for k, v in rec['stage_times_s'].items())}")
    print(f"peak RSS {rec['rss_peak_gib']:.2f} GiB (before {rec['rss_before_gib']:.2f} GiB)"
          + (f"; peak GPU {rec['gpu_peak_gib']:.2f} GiB" if cuda else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
