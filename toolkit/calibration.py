"""Calibration data and layer-by-layer activation capture.

:class:`LayerStream` runs the model once up to the first transformer layer, keeps the
hidden states entering it (on ``offload``, CPU by default) together with the keyword
arguments the backbone passes to its layers (attention mask, rotary embeddings), and then
runs ONE layer at a time: memory is bounded by one layer's activations, whatever the depth.
After a method changes layer ``l`` (masks, corrected weights) it calls :meth:`advance`, so
layer ``l + 1`` sees inputs produced by the already-pruned layers (sequential pruning).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch.base import Adapter

Batch = dict[str, torch.Tensor]


@dataclass
class CalibrationData:
    """Tokenised calibration batches plus where they came from.

    Each batch has ``input_ids`` and ``attention_mask`` (batch, seq) and, when labels are
    known, ``labels`` in the form the model's loss expects (class ids, regression targets, or
    next-token ids with -100 on padding).
    """

    batches: list[Batch]
    source: str = "?"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.batches:
            raise ValueError(f"calibration data from {self.source!r} is empty: give at least one example")

    @property
    def n_examples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def n_tokens(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)

    @property
    def seq_len(self) -> int:
        return max(int(b["input_ids"].shape[1]) for b in self.batches)

    @property
    def has_labels(self) -> bool:
        return all("labels" in b for b in self.batches)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "examples": self.n_examples, "tokens": self.n_tokens,
                "seq_len": self.seq_len, **self.meta}


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: Batch, *, labels: bool = False) -> Batch:
    """The keys of ``batch`` that a Hugging Face forward takes."""
    keys = ("input_ids", "attention_mask", "token_type_ids") + (("labels", "start_positions", "end_positions") if labels else ())
    return {k: v for k, v in batch.items() if k in keys}


def lm_batches_from_text(tokenizer: Any, text: str, *, seq_len: int, n_sequences: int, batch_size: int = 8,
                         source: str = "text") -> CalibrationData:
    """Causal-LM calibration: the text tokenised once and cut into ``n_sequences`` windows."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(n_sequences, ids.numel() // seq_len)
    if n < 1:
        raise ValueError(f"calibration text from {source!r} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].reshape(n, seq_len)  # (n, seq_len)
    batches = [
        {"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()}
        for w in windows.split(batch_size)
    ]
    return CalibrationData(batches, source=source, meta={"kind": "lm"})


def batches_from_texts(tokenizer: Any, texts: list[str] | list[tuple[str, str]], *, seq_len: int,
                       batch_size: int = 32, labels: list[Any] | None = None,
                       source: str = "texts") -> CalibrationData:
    """Encoder calibration: one (padded, truncated) sequence per text or text pair."""
    if not texts:
        raise ValueError(f"calibration data from {source!r} is empty: give at least one example")
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        if isinstance(chunk[0], tuple):
            enc = tokenizer([a for a, _ in chunk], [b for _, b in chunk], truncation=True,
                            max_length=seq_len, padding="max_length", return_tensors="pt")
        else:
            enc = tokenizer(list(chunk), truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if labels is not None:
            batch["labels"] = torch.as_tensor(labels[start:start + batch_size])
        batches.append(batch)
    return CalibrationData(batches, source=source, meta={"kind": "encoder"})


class _Stop(Exception):
    pass


class LayerStream:
    """Hidden states entering layer ``l`` for every calibration batch, one layer at a time."""

    def __init__(self, adapter: Adapter, calib: CalibrationData, *, device: torch.device | str | None = None,
                 offload: torch.device | str = "cpu") -> None:
        self.adapter, self.calib = adapter, calib
        self.device = torch.device(device) if device is not None else next(adapter.model.parameters()).device
        self.offload = torch.device(offload)
        self.layer = 0
        self._batch = 0  # index of the batch being run (for capture hooks)
        self.hidden: list[torch.Tensor] = []  # per batch: (batch, seq, hidden) on offload
        self.args: list[tuple[Any, ...]] = []  # per batch: further positional arguments of the layer call
        self.kwargs: list[dict[str, Any]] = []  # per batch: what the backbone passes every layer
        self.token_masks: list[torch.Tensor] = []  # per batch: (batch, seq) bool, True = real token
        first = adapter.layers()[0]

        def grab(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.hidden.append(hidden.detach().to(self.offload))
            self.args.append(tuple(args[1:]))
            self.kwargs.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache", "cache")})
            raise _Stop

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in calib.batches:
                    try:
                        adapter.backbone()(**model_inputs(to_device(batch, self.device)))
                    except _Stop:
                        pass
                    self.token_masks.append(batch["attention_mask"].bool())
        finally:
            handle.remove()

    def __len__(self) -> int:
        return self.adapter.num_layers

    def run(self, fn: Callable[[torch.Tensor, int], None] | None = None) -> list[torch.Tensor]:
        """Run the current layer on every batch; ``fn(output, batch_index)`` sees each output
        (batch, seq, hidden). Returns the outputs (on ``offload``)."""
        block = self.adapter.layers()[self.layer]
        outs = []
        with torch.no_grad():
            for i, (hidden, args, kwargs) in enumerate(zip(self.hidden, self.args, self.kwargs)):
                self._batch = i
                out = block(hidden.to(self.device), *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out  # (batch, seq, hidden)
                if fn is not None:
                    fn(out, i)
                outs.append(out.detach().to(self.offload))
        return outs

    @contextmanager
    def capture(self, module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], None], *,
                output: bool = False) -> Iterator[None]:
        """While open, every :meth:`run` calls ``fn(x, token_mask)`` with ``module``'s input
        (or output) of shape (batch, seq, features) and the batch's (batch, seq) token mask."""

        def hook(mod, args, out=None):
            x = out if output else args[0]
            x = x[0] if isinstance(x, tuple) else x
            fn(x.detach(), self.token_masks[self._batch].to(x.device))

        handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def advance(self) -> None:
        """Replace the stored hidden states by the current layer's outputs; move to the next."""
        self.hidden = self.run()
        self.layer += 1
