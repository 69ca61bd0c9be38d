"""Serial vs Ray executor on a tiny grid: wall time ratio and CPU utilisation.

    python benchmarks/ray_grid.py [--workers 2] [--seq-len 128 --calib-samples 16 --eval-samples 8] [--out FILE]

Grid: 4 methods (magnitude, stat, stat-uniform, fisher) x 2 budgets (0.7, 0.5) on a small random
Llama (GQA, 4 layers, hidden 256) with Python-docs perplexity, calibration 16 windows of 128
tokens by default (larger settings: the options). The same ``harness compare`` settings run once with the serial executor and once on a
local Ray instance with ``--workers`` CPUs (one per run), in this order, in one process; each
writes its records into its own temporary results directory, and the records are checked equal
but for timings and host fields. CPU utilisation is the machine's (``psutil``) busy fraction over
each phase: on a shared machine it includes other processes' load, so the script records the
load average before each phase too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def small_llama(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from _tokenizers import byte_bpe_tokenizer
    from tshrink.textdata import builtin_text

    tok = byte_bpe_tokenizer([builtin_text("calibration")[:200_000]])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    path = root / "small-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def phase(fn, label: str) -> dict:
    import psutil

    load = os.getloadavg()[0]
    before = psutil.cpu_times()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    after = psutil.cpu_times()
    busy = sum(getattr(after, f) - getattr(before, f) for f in ("user", "system", "nice"))
    total = busy + (after.idle - before.idle) + (getattr(after, "iowait", 0) - getattr(before, "iowait", 0))
    return {"phase": label, "wall_s": wall, "cpu_busy_fraction": busy / total if total else None,
            "cpu_busy_core_s": busy, "loadavg_1min_before": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "ray_grid_cpu.json"))
    args = p.parse_args()
    import ray
    import torch

    from tshrink.checkpoint import write_json_atomic
    from tshrink_harness.compare import compare
    from tshrink_harness.records import load_records

    os.environ.pop("TSHRINK_DATA_DIR", None)
    tmp = Path(tempfile.mkdtemp(prefix="ray-grid-"))
    model = small_llama(tmp)
    kw = dict(methods="magnitude,stat,stat-uniform,fisher", model=str(model), budgets=[0.7, 0.5], options={},
              seq_len=args.seq_len, calib_samples=args.calib_samples, eval_samples=args.eval_samples,
              latency_batch=[1], latency_warmup=1,
              latency_repeats=3, latency_min_time=0.05, leaderboard=False, reference=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task (one CPU per run): the same work per run
    serial = phase(lambda: compare(results_dir=str(tmp / "serial"), **kw), "serial (1 thread)")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    fanned = phase(lambda: compare(results_dir=str(tmp / "ray"), executor="ray", **kw), f"ray ({args.workers} CPUs)")
    ray.shutdown()

    def strip(rec: dict) -> dict:
        rec = {k: v for k, v in rec.items() if k not in ("latency", "device", "executor", "versions", "git")}
        for outer, inner in (("prune", "time_s"), ("prune", "timings_s"), ("evaluation", "time_s")):
            rec.get(outer, {}).pop(inner, None)
        return rec

    same = sorted(map(json.dumps, map(strip, load_records(tmp / "serial")))) == \
        sorted(map(json.dumps, map(strip, load_records(tmp / "ray"))))
    runs = len(load_records(tmp / "ray"))
    result = {"command": ["python", *sys.argv], "grid": "4 methods x 2 budgets + dense on a random Llama "
              f"(4 layers, hidden 256, 8 q / 2 kv heads), pydocs perplexity, {args.calib_samples} x {args.seq_len} "
              f"calibration tokens, {args.eval_samples} evaluation windows",
              "records": runs, "records_equal_but_timings_and_host": same, "serial": serial, "ray": fanned,
              "ray_init_s": ray_start, "wall_ratio_serial_over_ray": serial["wall_s"] / fanned["wall_s"],
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "note":
                          "shared 2-core machine: other jobs ran meanwhile; compare the ratio, not the seconds"}}
    out = Path(args.out)
    write_json_atomic(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
