"""Peak host memory of the Fisher mask gradients vs batch size, at a fixed micro-batch.

Each configuration runs in a fresh subprocess (peak RSS = ``ru_maxrss`` of that process) on
a random-weight Llama with a large vocabulary, where the logits dominate: hidden 256, 2
layers, 32,000-token vocabulary, sequences of ``--seq`` tokens. For every gradient batch
size it measures ``fisher_micro_batch=M`` with the chunked loss, and the unbounded path
(one forward over the whole batch with full logits: ``micro_batch=0``, one loss chunk) the
toolkit used before. Reported: peak RSS minus the RSS after building the model and the data.

    OMP_NUM_THREADS=1 python benchmarks/fisher_memory.py            # writes results/benchmarks/fisher_memory.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, torch
import transformers as tf
from tshrink.arch.families import get_adapter
from tshrink.calibration import CalibrationData
from tshrink_plugins.fisher.collect import collect_mask_grads
batch, seq, micro, chunk = map(int, sys.argv[1:5])
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
model = tf.AutoModelForCausalLM.from_config(cfg).eval()
ids = torch.randint(0, 32000, (batch, seq))
calib = CalibrationData([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
collect_mask_grads(get_adapter(model), calib, micro_batch=micro, chunk_tokens=chunk)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024}))
"""


def measure(batch: int, seq: int, micro: int, chunk: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(seq), str(micro), str(chunk)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"batch": batch, "seq": seq, "micro_batch": micro, "loss_chunk": chunk,
            "delta_mib": round(r["peak_mib"] - r["base_mib"], 1), "peak_mib": round(r["peak_mib"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="2,4,8,16")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "fisher_memory.json"))
    a = p.parse_args()
    rows = []
    for b in map(int, a.batches.split(",")):
        for micro, chunk, path in ((a.micro, a.chunk, "micro-batched + chunked loss"),
                                   (0, 10**9, "whole batch, full logits")):
            r = dict(measure(b, a.seq, micro, chunk), path=path)
            print(f"batch {b:3d}  {path:30s}  peak RSS - base = {r['delta_mib']:8.1f} MiB", flush=True)
            rows.append(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"command": "python benchmarks/fisher_memory.py " + " ".join(sys.argv[1:]),
                                       "model": "random Llama: vocab 32000, hidden 256, 2 layers, GQA 4/2",
                                       "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
