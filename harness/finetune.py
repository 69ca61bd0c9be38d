"""``harness finetune``: fine-tune a pretrained encoder on a GLUE task or SQuAD.

The usual recipe: AdamW (weight decay on everything but biases and LayerNorm weights),
linear decay after a linear warm-up, batch 32, lr 1e-4, max length 128 (384 for SQuAD),
bf16 autocast on CUDA only (fp32 on CPU), gradient clipping at 1.0; evaluation on the dev
split at the end. Seeded and deterministic: the classifier initialisation, shuffling and
dropout all come from ``--seed``. The checkpoint is cached: ``finetune.json`` next to it
records the recipe, the model and data hashes and the dev metrics, and a re-run whose
recipe + model + data hash matches reuses the checkpoint without training.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import records as R

MANIFEST = "finetune.json"
FORMAT = "tshrink-finetune/1"


@dataclass(frozen=True)
class Recipe:
    task: str
    epochs: float = 3.0
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int | None = None  # None: the task's (128 GLUE, 384 SQuAD)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    max_train_samples: int | None = None
    precision: str = "fp32"  # "bf16-autocast" on CUDA

    def check(self) -> None:
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"fine-tuning needs epochs > 0, lr > 0 and batch size >= 1; got {self}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max-train-samples must be at least 1, got {self.max_train_samples}")


def _optimizer(model: Any, recipe: Recipe) -> Any:
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)


def _schedule(optimizer: Any, warmup: int, total: int) -> Any:
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model: Any, tokenizer: Any, task: Any, recipe: Recipe, *, device: str, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``model`` in place; returns training figures (steps, losses, time)."""
    import torch

    rows = task.finetune_rows(tokenizer, max_length=recipe.max_length, limit=recipe.max_train_samples,
                              seed=recipe.seed)
    steps_per_epoch = math.ceil(len(rows) / recipe.batch_size)
    total = max(1, round(recipe.epochs * steps_per_epoch))
    warmup = int(recipe.warmup_ratio * total)
    model.to(device)
    model.train()
    opt = _optimizer(model, recipe)
    sched = _schedule(opt, warmup, total)
    gen = torch.Generator().manual_seed(recipe.seed)
    autocast = recipe.precision == "bf16-autocast"
    losses: list[float] = []
    start = time.perf_counter()
    order: list[int] = []
    bar = tqdm(range(total), desc=f"finetune {task.name}", unit="step", disable=not progress)
    for step in bar:
        if not order:
            order = torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:recipe.batch_size], order[recipe.batch_size:]
        batch = {k: v.to(device) for k, v in task.collate([rows[i] for i in idx], tokenizer).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    every = max(1, total // 50)
    return {"examples": len(rows), "steps": total, "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup,
            "final_loss": sum(losses[-every:]) / len(losses[-every:]), "loss_curve": losses[::every],
            "time_s": time.perf_counter() - start}


def finetune(*, task: str, model: str, output: str | None, epochs: float = 3.0, lr: float = 1e-4,
             batch_size: int = 32, max_length: int | None = None, warmup_ratio: float = 0.1,
             weight_decay: float = 0.01, seed: int = 0, max_train_samples: int | None = None,
             max_eval_samples: int | None = None, data_dir: str | None = None, device: str = "cpu",
             squad_split: str | None = None, force: bool = False, progress: bool = True,
             command: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune (or reuse the cached fine-tune); returns the ``finetune.json`` record."""
    import torch
    from transformers import AutoConfig

    from tshrink.checkpoint import write_json_atomic
    from tshrink.models import cache_dir, load_model, resolve_model
    from tshrink.outputs import check_output_dir

    from .data import resolve_data_dir
    from .run import check_device
    from .tasks.registry import config_kind, get_task

    t = get_task(task, squad_split=squad_split)
    if not t.finetunable:
        from .tasks.registry import task_names

        raise ValueError(f"task {t.name!r} cannot be fine-tuned here; fine-tunable tasks: "
                         + ", ".join(n for n in task_names() if get_task(n).finetunable))
    check_device(device)
    recipe = Recipe(task=t.name, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length or t.seq_len,
                    warmup_ratio=warmup_ratio, weight_decay=weight_decay, seed=seed,
                    max_train_samples=max_train_samples, precision="bf16-autocast" if device == "cuda" else "fp32")
    recipe.check()
    config = AutoConfig.from_pretrained(resolve_model(model))
    kind = config_kind(config)
    if kind not in (None, t.model_kind):
        what = "an encoder-decoder (seq2seq) model" if kind == "seq2seq" else "a decoder"
        raise ValueError(f"task {t.name!r} fine-tunes encoders; model {model!r} ({config.model_type}) is {what}")
    t.prepare(resolve_data_dir(data_dir), need_train=True)
    if output:  # refuse a protected path, a file or a user's directory before loading anything
        check_output_dir(output, markers=(MANIFEST,), overwrite=True, what="--output", flag="--force")
    # ---- checks done; the work (and the cache look-up, which hashes weights) starts here ----
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    net, tok = load_model(model, head=t.head, num_labels=t.num_labels)
    base_hash = R.hash_tensors(net)
    key = R.key_of([FORMAT, asdict(recipe), base_hash, t.info["data_hash"], max_eval_samples])
    out = Path(output) if output else cache_dir() / "finetuned" / f"{R.model_tag(model)}-{R.slug(t.name)}-{key}"
    cached = _read(out)
    if cached is not None and cached.get("key") == key and (out / "config.json").exists():
        print(f"[cached] {out} (recipe, model and data unchanged: key {key})")
        return cached
    if cached is not None and not force:
        raise ValueError(f"{out} holds a different fine-tune (key {cached.get('key')} != {key}); "
                         f"pass --force to replace it or choose another --output")
    # only a fine-tune's own directory (finetune.json) is ever replaced, and only with --force
    check_output_dir(out, markers=(MANIFEST,), overwrite=force, what="--output", flag="--force")
    torch.manual_seed(seed)  # the same dropout stream whatever the cache look-up did
    if device == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
    t.configure_model(net.config)
    figures = train(net, tok, t, recipe, device=device, progress=progress)
    start = time.perf_counter()
    ev = t.evaluate(net, tok, device=device, limit=max_eval_samples, seq_len=recipe.max_length, batch_size=64)
    record = R.jsonable({
        "format": FORMAT, "key": key, "recipe": asdict(recipe), "model": {"spec": model, "hash": base_hash},
        "task": dict(t.info, name=t.name, main_metric=t.main_metric), "dev_metrics": ev.metrics,
        "dev_evaluation": dict(ev.info, time_s=time.perf_counter() - start), "train": figures,
        "max_eval_samples": max_eval_samples, "device": R.device_info(device), "versions": R.versions(),
        "git": R.git_revision(), "command": command, "weights_hash": R.hash_tensors(net)})
    _save(net.to("cpu"), tok, out, record, write_json_atomic, overwrite=force)
    return record


def _read(out: Path) -> dict[str, Any] | None:
    import json

    file = out / MANIFEST
    return json.loads(file.read_text()) if file.exists() else None


def _save(model: Any, tokenizer: Any, out: Path, record: dict[str, Any], write_json: Any, *,
          overwrite: bool) -> None:
    """Checkpoint + finetune.json into a staged sibling, swapped into place (tshrink.outputs)."""
    from tshrink.outputs import atomic_dir

    with atomic_dir(out, markers=(MANIFEST,), overwrite=overwrite, what="--output", flag="--force") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, record)
