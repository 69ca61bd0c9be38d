"""Measurements shared by compare and finetune: latency, size on disk, bits per weight."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch



def latency_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch of token ids (content does not change the cost of a forward)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def latency(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str, *, warmup: int = 2,
            repeats: int = 5) -> dict[str, Any]:
    """Median wall time (ms) of one forward pass on ``batch`` after ``warmup`` passes.

    ``batch``: ``input_ids`` / ``attention_mask`` (batch, seq). An encoder-decoder
    (``config.is_encoder_decoder``, e.g. Marian) without ``decoder_input_ids`` in the batch
    gets the input ids as its target: one teacher-forced pass, encoder and decoder over
    seq tokens each (``decoder_seq_len`` in the result)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency needs repeats >= 1 and warmup >= 0, got {repeats} / {warmup}")
    inputs = {k: v.to(device) for k, v in batch.items()}
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if seq2seq and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = inputs["input_ids"]
    kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    model.eval()
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
           "batch_size": int(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1]),
           "warmup": warmup, "repeats": repeats}
    if seq2seq:
        out["decoder_seq_len"] = int(inputs["decoder_input_ids"].shape[1])
    return out


def checkpoint_bytes(path: str | Path) -> tuple[int, str]:
    """(bytes, how) of a checkpoint written by ``tshrink.checkpoint.save_pruned``.

    With the quantization plugin installed its measure is used for every checkpoint (dense
    ones too, so ratios compare like with like): ``compressed.safetensors`` + the data bytes
    of the float tensors no quant stage replaced. Without it: the safetensors files' sizes.
    """
    path = Path(path)
    try:
        from tshrink_plugins.quant.apply import compressed_size_bytes
    except ImportError:
        files = sorted(path.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files), "size of " + "+".join(f.name for f in files)
    return int(compressed_size_bytes(path)), "tshrink_plugins.quant.apply.compressed_size_bytes"


def saved_size(model: torch.nn.Module, compressed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save ``model`` (with its transform stages' compact forms) to a temporary directory
    and measure it."""
    from tshrink.checkpoint import save_pruned

    with tempfile.TemporaryDirectory(prefix="tshrink-size-") as tmp:
        save_pruned(model, Path(tmp) / "ckpt", compressed=compressed)
        size, how = checkpoint_bytes(Path(tmp) / "ckpt")
    return {"bytes": size, "measured_by": how}


def bits_per_weight(model: torch.nn.Module, transforms: dict[str, Any] | None) -> float:
    """Bits per weight of the compressed weights: the transform stages' ``bits_per_weight``
    (weighted by their ``quantized_params`` when several report), else the dtype's bits."""
    reported = [(r["bits_per_weight"], r.get("quantized_params", 1)) for r in (transforms or {}).values()
                if isinstance(r, dict) and isinstance(r.get("bits_per_weight"), (int, float))]
    if reported:
        total = sum(n for _, n in reported) or 1
        return float(sum(b * n for b, n in reported) / total)
    param = next(model.parameters())
    return float(torch.finfo(param.dtype).bits if param.is_floating_point() else torch.iinfo(param.dtype).bits)
