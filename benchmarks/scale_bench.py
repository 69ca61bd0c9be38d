"""Cost of a prune by model shape: per-layer time and peak memory of STAT, Fisher and magnitude.

Shapes: SmolLM2-135M (the real packaged model, WikiText-2 calibration) and random-weight
Llama-3.2-1B, Llama-2-7B and Llama-2-70B shapes of which only ``--layers`` transformer layers
are built (hidden size, MLP width, heads, KV heads and vocabulary as published). Every
configuration runs in a fresh subprocess; measured there:

* ``rss_peak`` (ru_maxrss) after the prune; ``peak - weights`` is everything but the weights
  (runtime + the prune's statistics, activations, hidden states: the device-memory term of
  a GPU run); ``work = rss_peak - rss_base``, ``rss_base`` the high-water mark after building
  (understated when building peaked higher than the prune);
* the pipeline's stage timings; per-layer time = (score + select + refine + correct) / layers.
  The method's first stage also pays the prologue (embeddings) -- negligible next to a layer.

The default suite is the set committed under results/benchmarks/scale.json: SmolLM2 (real,
512 WikiText-2 tokens) at 2 and 4 layers and in full (30 layers: ``t_full ~= L * t_layer``),
the SmolLM2 shape at 2 layers for 1k/4k/16k random tokens (linear in tokens), the 1B and
7B shapes at 2 and 4 layers (one 128-token sequence: the shared CPU is slow; memory flat in
depth; Fisher on 7B at 2 layers only), and the 70B shape (2 layers) with magnitude only:
STAT's exact statistics of its 28,672-neuron MLP are 6 x 8 x 28672^2 B = 39 GB at their
peak (float64 Gram and the copies its decomposition holds) and Fisher backpropagates through 3.4 GB layers, more than this
shared 24 GiB CPU host could give in the time -- the extrapolation formula covers them.

    OMP_NUM_THREADS=2 python benchmarks/scale_bench.py --data-dir ../shared/data   # the suite, CPU (add --resume to continue)
    python benchmarks/scale_bench.py --one llama-2-7b --layers 2 --method stat --tokens 512
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tshrink.placement import STATS_COPIES  # noqa: E402  (one constant for the planner and the formula)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "benchmarks" / "scale.json"

SHAPES = {  # published configs (hidden, MLP width, layers, heads, KV heads, vocabulary)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}
METHODS = {"stat": "stat", "fisher": "fisher", "magnitude": "magnitude"}


def child(cfg: dict) -> dict:
    """One measurement (runs in its own process)."""
    import resource

    import torch
    import transformers as tf

    from tshrink.calibration import CalibrationData, lm_batches_from_text
    from tshrink.pipeline import prune

    torch.manual_seed(0)
    dtype = getattr(torch, cfg["dtype"])
    seq, n_seq, batch = cfg["seq"], cfg["tokens"] // cfg["seq"], cfg["batch"]
    if cfg["shape"] == "smollm2-135m" and cfg.get("real", False):
        from tshrink.models import load_model
        from tshrink_harness.tasks.wikitext import calibration_text

        model, tok = load_model("smollm2", head="causal-lm", dtype=dtype)
        if cfg["layers"] < model.config.num_hidden_layers:
            del model.model.layers[cfg["layers"]:]
            model.config.num_hidden_layers = cfg["layers"]
        calib = lm_batches_from_text(tok, calibration_text(cfg.get("data_dir")), seq_len=seq, n_sequences=n_seq,
                                     batch_size=batch, source="WikiText-2 valid")
        if calib.n_tokens < cfg["tokens"]:
            raise SystemExit(f"WikiText-2 valid gave {calib.n_tokens} tokens, fewer than {cfg['tokens']}")
    else:
        conf = tf.LlamaConfig(**dict(SHAPES[cfg["shape"]], num_hidden_layers=cfg["layers"],
                                     max_position_embeddings=max(seq, 128)))
        with torch.device("cpu"):
            model = tf.LlamaForCausalLM._from_config(conf, dtype=dtype)  # random init, in dtype
        model.eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, conf.vocab_size, (n_seq, seq), generator=g)
        calib = CalibrationData([{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()}
                                 for w in ids.split(batch)], source="random tokens")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    res = prune(model, METHODS[cfg["method"]], cfg["budget"], calib=calib, seed=0,
                options={"fisher_micro_batch": 1} if cfg["method"] == "fisher" else None)
    wall = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timings = res.report["timings_s"]
    layer_time = sum(v for k, v in timings.items() if k.split(":")[0] in ("score", "select", "refine", "correct"))
    return dict(cfg, weights_gib=weights / 2**30, rss_base_gib=rss_base / 2**30, rss_peak_gib=rss_peak / 2**30,
                work_gib=(rss_peak - rss_base) / 2**30, prune_s=wall, per_layer_s=layer_time / cfg["layers"],
                timings_s=timings, tokens_used=calib.n_tokens, flops_kept=res.report["flops_kept"],
                torch_threads=torch.get_num_threads())


def run(cfg: dict) -> dict:
    # a fixed mmap threshold: glibc's dynamic one keeps freed large blocks in the heap, and
    # ru_maxrss then grows with the number of layers processed although live memory does not
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        return dict(cfg, error=(proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def suite(data_dir: str | None) -> list[dict]:
    """The committed set, cheapest first (the shared CPU host gave this a fraction of 2 cores)."""
    base = dict(seq=128, batch=4, budget=0.5, dtype="float32", data_dir=data_dir)
    runs = []
    for layers in (2, 4):  # memory flat in depth; per-layer time
        for method in ("stat", "fisher", "magnitude"):
            runs.append(dict(base, shape="smollm2-135m", real=True, layers=layers, tokens=512, method=method))
    for tokens in (1024, 4096, 16384):  # linear in calibration tokens
        runs.append(dict(base, shape="smollm2-135m", layers=2, tokens=tokens, method="stat", batch=16))
    big = dict(base, tokens=128, batch=1)  # one 128-token sequence: the shared CPU is slow
    for layers in (2, 4):
        for method in ("stat", "fisher", "magnitude"):
            runs.append(dict(big, shape="llama-3.2-1b", layers=layers, method=method))
    for layers in (2, 4):
        for method in ("stat", "magnitude"):
            runs.append(dict(big, shape="llama-2-7b", layers=layers, method=method, dtype="bfloat16"))
    runs.append(dict(base, shape="smollm2-135m", real=True, layers=30, tokens=512, method="stat"))  # a full model
    runs.append(dict(big, shape="llama-2-70b", layers=2, method="magnitude", dtype="bfloat16"))
    # Fisher on 7B at 2 layers only (~3 min per layer here: eigvalsh of the k x k tuning system)
    runs.append(dict(big, shape="llama-2-7b", layers=2, method="fisher", dtype="bfloat16"))
    return runs


# -- the extrapolation formula ----------------------------------------------------------------
def layer_params(shape: dict) -> int:
    h, n = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * n


def stat_cost(shape: dict, tokens: int, seq: int, batch_tokens: int, dtype_bytes: int, kept: float = 0.5) -> dict:
    """Per-layer work of a STAT prune (score + correct, ``stat_sequential=layer``: 3 layer
    passes over the calibration tokens, 2 of them accumulating statistics, 2 decompositions).

    FLOPs (1 multiply-add = 2 FLOPs here, as hardware throughput is quoted):
      forward   = 3 passes x (2 P T + 2 T s h)            P params/layer, T tokens, s seq, h hidden
      gram      = 2 passes x 2 T (n^2 + h^2)    [float64]  n = MLP width
      decompose = 2 x (n^2 r + h^3)              [float64]  r = min(T, n): pivoted Cholesky to rank r
      fold      = 2 x (k n h + k^3 / 3) + (same for attention, n -> h)   k = kept width (budget x n):
                  the least-squares refit G_K W^T and the Cholesky of G_KK  [float64]
    Bytes moved host<->device with layer offload: 2 P b (the layer, once per stage) + 6 T h b
    (hidden states in and out of each pass), b = bytes per weight.
    Device memory: P b + c x 8 (n^2 + h^2) (the float64 Gram and the copies the decomposition
    holds at its peak: c = 6, measured 5.8 on the 7B-shaped layer, ~3 on the 1B one) + one batch
    of activations B (4 h b + 12 n) + the hidden states 2 T h b (on the device when they fit).
    """
    h, n = shape["hidden_size"], shape["intermediate_size"]
    P, T, r = layer_params(shape), tokens, min(tokens, n)
    k, kh = kept * n, kept * h
    return {
        "forward_flops": 3 * (2 * P * T + 2 * T * seq * h),
        "gram_flops": 2 * 2 * T * (n * n + h * h),
        "decompose_flops": 2 * (n * n * r + h ** 3) + 2 * (k * n * h + k ** 3 / 3) + 2 * (kh * h * h + kh ** 3 / 3),
        "transfer_bytes": 2 * P * dtype_bytes + 6 * T * h * dtype_bytes,
        "layer_bytes": P * dtype_bytes,
        "stats_bytes": STATS_COPIES * 8 * (n * n + h * h),
        "batch_bytes": batch_tokens * (4 * h * dtype_bytes + 12 * n),
        "hidden_bytes": 2 * T * h * dtype_bytes,
        "outside_bytes": shape["vocab_size"] * h * dtype_bytes * (1 if shape.get("tie_word_embeddings") else 2),
    }


# assumed sustained rates of one H100/H200-class GPU -- NOT measured here (no GPU was lent)
GPU_RATES = {"forward_flops": 400e12, "gram_flops": 50e12, "decompose_flops": 10e12, "transfer_bytes": 20e9}


def gpu_estimate(name: str, tokens: int = 512 * 2048, seq: int = 2048, batch: int = 8) -> dict:
    shape = SHAPES[name]
    c = stat_cost(shape, tokens, seq, batch * seq, 2)
    per_layer = {k: c[k] / v for k, v in GPU_RATES.items()}
    L = shape["num_hidden_layers"]
    device_peak = c["outside_bytes"] + c["layer_bytes"] + c["stats_bytes"] + c["batch_bytes"]
    return {"shape": name, "tokens": tokens, "seq": seq, "batch": batch, "per_layer_s": per_layer,
            "total_min": L * sum(per_layer.values()) / 60, "device_peak_gib_hidden_on_host": device_peak / 2**30,
            "hidden_states_gib": c["hidden_bytes"] / 2**30,
            "device_peak_gib_hidden_on_device": (device_peak + c["hidden_bytes"]) / 2**30,
            "host_weights_gib": (c["outside_bytes"] + L * c["layer_bytes"]) / 2**30}


def table(data: dict) -> str:
    runs = [r for r in data["runs"] if "error" not in r]
    out = ["peak - weights: everything the process holds besides the weights (the Python/torch runtime, "
           "~0.4 GiB, plus the prune's working memory); work: peak minus the high-water mark after building "
           "(understated when building peaked higher, e.g. SmolLM2 loaded with 30 layers, then cut).", "",
           "| shape | layers | method | tokens | dtype | weights GiB | peak - weights GiB | work GiB | peak RSS GiB "
           "| s / layer | formula GFLOP / layer | GFLOP/s |",
           "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        extra = "| | |"
        if r["method"] == "stat":
            c = stat_cost(SHAPES[r["shape"]], r["tokens_used"], r["seq"], r["batch"] * r["seq"], 4)
            f = c["forward_flops"] + c["gram_flops"] + c["decompose_flops"]
            extra = f"| {f / 1e9:.0f} | {f / 1e9 / r['per_layer_s']:.1f} |"
        out.append(f"| {r['shape']} | {r['layers']} | {r['method']} | {r['tokens']} | {r['dtype']} | "
                   f"{r['weights_gib']:.2f} | {r['rss_peak_gib'] - r['weights_gib']:.2f} | {r['work_gib']:.2f} | "
                   f"{r['rss_peak_gib']:.2f} | {r['per_layer_s']:.2f} "
                   + extra)
    errors = [r for r in data["runs"] if "error" in r]
    for r in errors:
        out.append(f"| {r['shape']} | {r['layers']} | {r['method']} | {r['tokens']} | {r['dtype']} | failed: "
                   f"{r['error'][:80]} | | | | | | |")
    out += ["", "GPU extrapolation of a full STAT prune (512 x 2048 calibration tokens, bfloat16, batch 8; "
            f"assumed rates {GPU_RATES}, not measured):", "",
            "| shape | min total | device peak GiB (hidden on host) | hidden states GiB | host weights GiB |",
            "|---|---:|---:|---:|---:|"]
    for name in ("llama-3.2-1b", "llama-2-7b", "llama-2-70b"):
        e = gpu_estimate(name)
        out.append(f"| {name} | {e['total_min']:.0f} | {e['device_peak_gib_hidden_on_host']:.1f} | "
                   f"{e['hidden_states_gib']:.1f} | {e['host_weights_gib']:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--one", default=None, choices=sorted(SHAPES), help="run one configuration only")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--method", default="stat", choices=sorted(METHODS))
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (sequences of --seq)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--table", action="store_true", help="only (re)write scale.md from scale.json")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the others")
    a = p.parse_args()
    if a.table:
        md = Path(a.out).with_suffix(".md")
        md.write_text(table(json.loads(Path(a.out).read_text())))
        print(md.read_text())
        return
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.one:
        cfgs = [dict(shape=a.one, layers=a.layers, method=a.method, tokens=a.tokens, seq=a.seq, batch=a.batch,
                     budget=0.5, dtype=a.dtype, data_dir=a.data_dir, real=a.one == "smollm2-135m")]
    else:
        cfgs = suite(a.data_dir)
    rows = []
    if a.resume and Path(a.out).exists():
        rows = [r for r in json.loads(Path(a.out).read_text())["runs"] if "error" not in r]
        cfgs = [c for c in cfgs if not any(all(r.get(k) == v for k, v in c.items()) for r in rows)]
    for cfg in cfgs:
        r = run(cfg)
        rows.append(r)
        if "error" in r:
            print(f"{cfg['shape']:13s} L={cfg['layers']:2d} {cfg['method']:9s} T={cfg['tokens']:6d}  ERROR {r['error']}",
                  flush=True)
        else:
            print(f"{r['shape']:13s} L={r['layers']:2d} {r['method']:9s} T={r['tokens']:6d} {r['dtype']:8s} "
                  f"weights {r['weights_gib']:6.2f} GiB  work {r['work_gib']:6.2f} GiB  peak {r['rss_peak_gib']:6.2f} GiB  "
                  f"{r['per_layer_s']:7.2f} s/layer  prune {r['prune_s']:7.1f} s", flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "command": "python benchmarks/scale_bench.py " + " ".join(sys.argv[1:]),
            "host": platform.node(), "processor": platform.processor() or platform.machine(),
            "note": "CPU only (no GPU lent); shared 2-core host: compare ratios within this file",
            "runs": rows}, indent=2) + "\n")
    Path(a.out).with_suffix(".md").write_text(table(json.loads(Path(a.out).read_text())))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
