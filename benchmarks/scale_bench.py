"""Cost of a prune by model shape: per-layer time and peak memory of STAT, Fisher and magnitude.

Shapes: SmolLM2-135M (the real packaged model, WikiText-2 calibration) and random-weight
Llama-3.2-1B, Llama-2-7B and Llama-2-70B shapes of which only ``--layers`` transformer layers
are built (hidden size, MLP width, heads, KV heads and vocabulary as published). Every
configuration runs in a fresh subprocess; measured there:

* ``rss_base`` after building the model and the calibration data, ``rss_peak`` (ru_maxrss)
  after the prune: ``work = rss_peak - rss_base`` is what the prune itself holds on top of
  the weights (the device-memory term of a GPU run: statistics, activations, hidden states);
* the pipeline's stage timings; per-layer time = (score + select + refine + correct) / layers.
  The method's first stage also pays the prologue (embeddings) -- negligible next to a layer.

The default suite is the set committed under results/benchmarks/scale.json: SmolLM2 (real,
512 WikiText-2 tokens), the 1B and 7B shapes at 2 and 4 layers (one 128-token sequence:
the shared CPU is slow; memory flat in depth), the SmolLM2 shape at 2 layers for 1k/4k/16k
random tokens (linear in tokens), the 1B shape in full (16 layers) to check the
extrapolation ``t_full ~= L * t_layer``, and the 70B shape (2 layers) with magnitude and
Fisher only: STAT's
exact statistics of its 28,672-neuron MLP are 3 x 8 x 28672^2 B = 19.7 GB (float64 Gram,
scaled copy, factor), more than this 24 GiB shared CPU host can give -- the extrapolation
formula (README) covers it.

    OMP_NUM_THREADS=2 python benchmarks/scale_bench.py --data-dir ../shared/data   # the suite, CPU, ~30 min
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
    """The committed set, cheapest first (the shared CPU host gives a fraction of 2 cores)."""
    base = dict(seq=128, batch=4, budget=0.5, dtype="float32", data_dir=data_dir)
    runs = []
    for layers in (2, 4):  # memory flat in depth; per-layer time
        for method in ("stat", "fisher", "magnitude"):
            runs.append(dict(base, shape="smollm2-135m", real=True, layers=layers, tokens=512, method=method))
    for tokens in (1024, 4096, 16384):  # linear in calibration tokens
        runs.append(dict(base, shape="smollm2-135m", layers=2, tokens=tokens, method="stat", batch=16))
    for shape, dt in (("llama-3.2-1b", "float32"), ("llama-2-7b", "bfloat16")):
        for layers in (2, 4):
            for method in ("stat", "fisher", "magnitude"):
                runs.append(dict(base, shape=shape, layers=layers, tokens=128, batch=1, method=method, dtype=dt))
    runs.append(dict(base, shape="llama-3.2-1b", layers=16, tokens=128, batch=1, method="stat"))  # full 1B prune
    for method in ("magnitude", "fisher"):
        runs.append(dict(base, shape="llama-2-70b", layers=2, tokens=128, batch=1, method=method, dtype="bfloat16"))
    return runs


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
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.one:
        cfgs = [dict(shape=a.one, layers=a.layers, method=a.method, tokens=a.tokens, seq=a.seq, batch=a.batch,
                     budget=0.5, dtype=a.dtype, data_dir=a.data_dir, real=a.one == "smollm2-135m")]
    else:
        cfgs = suite(a.data_dir)
    rows = []
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
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
