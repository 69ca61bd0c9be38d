"""Calibration data and layer-by-layer activation capture.

:class:`LayerStream` runs the model once up to the first transformer layer, keeps the
hidden states entering it (on ``offload``, CPU by default) together with the keyword
arguments the backbone passes to its layers (attention mask, rotary embeddings), and then
runs ONE layer at a time: memory is bounded by one layer's activations, whatever the depth.
After a method changes layer ``l`` (masks, corrected weights) it calls :meth:`advance`, so
layer ``l + 1`` sees inputs produced by the already-pruned layers (sequential pruning).

Models whose layers differ in kind (``config.layer_types``: Gemma 2/3's sliding-window and
global layers, each with its own mask and rotary table) get the arguments of every layer:
the first pass then runs each layer as a recorder that passes its input through, so it
costs the embeddings and the final norm only, and the stored arguments are references to
the few tensors the backbone builds once per batch.

Decoders: the backbone runs with ``use_cache=False`` and the cache keywords it hands its
layers (``cache`` under transformers 5) are dropped, so repeated passes see no growing KV
cache; positions come from the attention mask, so left- and right-padded batches give the
real tokens the activations they have unpadded.
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


# keyword arguments of a layer call that carry the KV cache: never kept between passes
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position")


def _is_cache(value: Any) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(value).__mro__)


def decoder_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) positions counted over real tokens only, so a left-padded sequence gets
    the positions it has unpadded (right padding: the positions are unchanged)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def _layer_inputs(batch: Batch, causal: bool) -> dict[str, Any]:
    """Backbone inputs of one calibration batch: decoders get ``use_cache=False`` (no KV
    cache is created, so none can grow across passes) and mask-derived positions."""
    inputs: dict[str, Any] = dict(model_inputs(batch))
    if causal:
        inputs["use_cache"] = False
        if "attention_mask" in inputs:
            inputs["position_ids"] = decoder_position_ids(inputs["attention_mask"])
    return inputs


def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (containers, objects)."""
    seen = _seen if _seen is not None else set()
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), nn.Module)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensor_bytes(vars(obj), seen)
    return 0


class LayerStream:
    """Hidden states entering layer ``l`` for every calibration batch, one layer at a time.

    ``device``: where layers run. ``offload``: where the hidden states are kept between
    passes (host memory by default; the device itself when they fit there).
    ``layer_offload``: the layers' weights live on the host; the current layer is moved to
    ``device`` by its first :meth:`run` and back by :meth:`advance` / :meth:`release`, so
    a method may also correct its weights on the device -- peak device memory is one layer's
    weights plus one batch of activations (plus what the caller's statistics hold).
    The modules outside the layers (embeddings, rotary tables) must be on ``device``.

    Nothing from one pass is kept for the next but the hidden states: decoders run with
    ``use_cache=False`` and every cache-like keyword the backbone passes its layers
    (``cache`` / ``past_key_values`` under transformers 5) is dropped.
    """

    def __init__(self, adapter: Adapter, calib: CalibrationData, *, device: torch.device | str | None = None,
                 offload: torch.device | str = "cpu", layer_offload: bool = False) -> None:
        self.adapter, self.calib = adapter, calib
        self.device = torch.device(device) if device is not None else next(adapter.model.parameters()).device
        self.offload = torch.device(offload)
        self.layer_offload = layer_offload
        self.host = torch.device("cpu")
        self.layer = 0
        self._batch = 0  # index of the batch being run (for capture hooks)
        self.hidden: list[torch.Tensor] = []  # per batch: (batch, seq, hidden) on offload
        self.token_masks: list[torch.Tensor] = []  # per batch: (batch, seq) bool, True = real token
        # per layer kind, per batch: the further positional / keyword arguments of the layer call
        self._layer_args: dict[int, list[tuple[Any, ...]]] = {}
        self._layer_kwargs: dict[int, list[dict[str, Any]]] = {}
        types = list(getattr(adapter.config, "layer_types", None) or [])
        per_layer = len(types) == adapter.num_layers and len(set(types)) > 1
        self._kind = [types.index(t) for t in types] if per_layer else [0] * adapter.num_layers
        layers = adapter.layers()

        def keep(value: Any) -> Any:  # positional/keyword tensors: kept where the hidden states are
            return value.detach().to(self.offload) if isinstance(value, torch.Tensor) else value

        def record(layer: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if layer == 0:
                self.hidden.append(self._store(hidden.detach()))
            if self._kind[layer] == layer:  # first layer of its kind; no cache is ever kept
                self._layer_args.setdefault(layer, []).append(tuple(a for a in args[1:] if not _is_cache(a)))
                self._layer_kwargs.setdefault(layer, []).append(
                    {k: keep(v) if not isinstance(v, tuple) else tuple(keep(x) for x in v)
                     for k, v in kwargs.items() if k not in _CACHE_KWARGS and not _is_cache(v)})
            return hidden

        def grab(module, args, kwargs):
            record(0, args, kwargs)
            raise _Stop

        handles, saved = [], []
        try:
            if per_layer:  # every layer records and passes its input through
                for i, block in enumerate(layers):
                    saved.append((block, block.__dict__.get("forward")))
                    block.forward = lambda *a, _i=i, **k: record(_i, a, k)
            else:
                handles.append(layers[0].register_forward_pre_hook(grab, with_kwargs=True))
            with torch.no_grad():
                for batch in calib.batches:
                    try:
                        adapter.backbone()(**_layer_inputs(to_device(batch, self.device), adapter.causal))
                    except _Stop:
                        pass
                    self.token_masks.append(batch["attention_mask"].bool())
        finally:
            for h in handles:
                h.remove()
            for block, fwd in saved:
                if fwd is None:
                    del block.forward
                else:
                    block.forward = fwd
        self.args: list[tuple[Any, ...]] = self._layer_args[0]  # per batch: layer 0's further positional arguments
        self.kwargs: list[dict[str, Any]] = self._layer_kwargs[0]  # per batch: what the backbone passes layer 0

    def __len__(self) -> int:
        return self.adapter.num_layers

    def held_bytes(self) -> int:
        """Bytes of the tensors the stream keeps between passes (hidden states, layer arguments)."""
        return tensor_bytes([self.hidden, self.args, self.kwargs, self.token_masks])

    def _residency(self) -> dict[str, Any]:
        # shared by every stream over this adapter (mask tuning runs a teacher and a student)
        return self.adapter.model.__dict__.setdefault("_tshrink_resident", {"layers": set(), "max": 0})

    def _acquire(self) -> None:
        """Layer offload: put the current layer on the device (evicting any other first)."""
        if not self.layer_offload:
            return
        r = self._residency()
        if self.layer in r["layers"]:
            return
        layers = self.adapter.layers()
        for other in sorted(r["layers"]):
            layers[other].to(self.host)
            r["layers"].discard(other)
        layers[self.layer].to(self.device)
        r["layers"].add(self.layer)
        r["max"] = max(r["max"], len(r["layers"]))

    def release(self) -> None:
        """Layer offload: move the current layer back to the host (call when done with it;
        :meth:`advance` does)."""
        if self.layer_offload and self.layer in self._residency()["layers"]:
            self.adapter.layers()[self.layer].to(self.host)
            self._residency()["layers"].discard(self.layer)

    @property
    def max_resident(self) -> int:
        """Most layers on the device at once so far (layer offload)."""
        return self._residency()["max"]

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where hidden states are kept: on the host in pinned memory when the layers run
        on a GPU (so the next pass's upload is asynchronous), else on ``offload``."""
        if self.offload.type == "cpu" and self.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t)
        return t.to(self.offload)

    def _move(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(self.device, non_blocking=True)
        if isinstance(value, tuple):
            return tuple(self._move(v) for v in value)
        return value

    def run(self, fn: Callable[[torch.Tensor, int], None] | None = None, *,
            keep: bool = False) -> list[torch.Tensor] | None:
        """Run the current layer on every batch; ``fn(output, batch_index)`` sees each output
        (batch, seq, hidden) on the device. ``keep``: also return the outputs (on ``offload``);
        a capture-only pass (the default) copies nothing back."""
        block = self.adapter.layers()[self.layer]
        kind = self._kind[self.layer]
        outs: list[torch.Tensor] = []
        self._acquire()
        with torch.no_grad():
            for i, (hidden, args, kwargs) in enumerate(zip(self.hidden, self._layer_args[kind],
                                                           self._layer_kwargs[kind])):
                self._batch = i
                out = block(hidden.to(self.device, non_blocking=True), *self._move(args), **{k: self._move(v) for k, v in kwargs.items()})
                out = out[0] if isinstance(out, tuple) else out  # (batch, seq, hidden)
                if fn is not None:
                    fn(out, i)
                if keep:
                    outs.append(self._store(out.detach()))
                del out
        return outs if keep else None

    @contextmanager
    def capture(self, module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], None], *,
                output: bool = False) -> Iterator[None]:
        """While open, every :meth:`run` calls ``fn(x, token_mask)`` with ``module``'s input
        (or output) of shape (batch, seq, features) and the batch's (batch, seq) token mask."""

        def hook(mod, args, out=None):
            x = out if output else args[0]
            x = x[0] if isinstance(x, tuple) else x
            mask = self.token_masks[self._batch].to(x.device)
            if x.dim() == 2 and x.shape[0] == mask.numel():  # OPT runs its MLP on (batch*seq, features)
                x = x.reshape(*mask.shape, x.shape[-1])
            fn(x.detach(), mask)

        handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def advance(self, fn: Callable[[torch.Tensor, int], None] | None = None) -> None:
        """Replace the stored hidden states by the current layer's outputs (one pass, with
        ``fn`` and any open captures); move to the next layer."""
        outs = self.run(fn, keep=True)
        assert outs is not None
        self.hidden = outs
        self.release()
        self.layer += 1
