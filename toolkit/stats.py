"""Activation statistics per unit, layer by layer: what activation-aware methods are made of.

:func:`layer_stats` walks the layers of a model on calibration data with a
:class:`tshrink.calibration.LayerStream` (one layer's activations in memory at a time) and
yields, per layer, statistics of the inputs of the two projections whose input columns *are*
the units:

* ``heads``: the attention output projection's input ``X`` (tokens, units*group*head_dim);
  unit ``u`` (one head, or one KV group under GQA) owns the block of ``width = group*head_dim``
  columns ``[u*width, (u+1)*width)`` (:meth:`tshrink.arch.base.Adapter.unit_columns`);
* ``neurons``: the down projection's input ``A`` (tokens, neurons) (for a gated MLP
  ``act(gate) * up``); width 1.

Only real tokens count (the calibration batches' attention masks); rows holding NaN/inf are
skipped and counted. The default accumulator, :class:`UnitSums`, keeps float64 sums grouped
by unit: ``sum``, ``sq_sum`` (so ``mean``, ``var``, squared norms) and optionally Gram blocks
per unit (``gram="unit"``) or the whole Gram (``gram="full"``). Wanda-sp (``|W| * ||x_j||``),
FLAP (fluctuation ``var_j * ||W_j||^2``) and STAT/least-squares folds (Gram) are all a few
lines on top; another accumulator (a sketch, say) plugs in through ``accumulator=``.

Sequential methods (``sequential=True``): after the loop body has changed layer ``l``
(weights folded, and :meth:`LayerStats.keep` told which units stay), the stream runs the
changed layer with the dropped units masked to zero, so layer ``l + 1`` is measured on the
outputs of the already-pruned model. Otherwise the statistics of layer ``l`` are taken on the
same pass that produces layer ``l + 1``'s inputs (one forward per layer, dense model).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .arch.base import Adapter, AttnParts, MlpParts
from .calibration import CalibrationData, LayerStream
from .masking import soft_masks
from .progress import Track, untracked

GRAMS = ("none", "unit", "full")
_F64 = torch.float64


class Accumulator(Protocol):
    def update(self, x: torch.Tensor, token_mask: torch.Tensor) -> None: ...


class UnitSums:
    """Float64 sums over real tokens of a projection's input, columns grouped by unit.

    ``sum``/``sq_sum``: (units, width); ``gram``: (units, width, width) for ``gram="unit"``,
    (units*width, units*width) for ``gram="full"``, None for ``"none"``; ``count``: tokens used;
    ``dropped``: real-token rows skipped for NaN/inf.
    """

    def __init__(self, units: int, width: int, *, gram: str = "none", device: torch.device | str | None = None) -> None:
        if gram not in GRAMS:
            raise ValueError(f"gram={gram!r} is not one of {GRAMS}")
        self.units, self.width, self.kind = units, width, gram
        self.count = 0
        self.dropped = 0
        self.sum = torch.zeros(units, width, dtype=_F64, device=device)  # (units, width)
        self.sq_sum = torch.zeros(units, width, dtype=_F64, device=device)  # (units, width)
        n = units * width
        self.gram: torch.Tensor | None = (
            torch.zeros(units, width, width, dtype=_F64, device=device) if gram == "unit"
            else torch.zeros(n, n, dtype=_F64, device=device) if gram == "full" else None)

    def update(self, x: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Add the rows of ``x`` (batch, seq, units*width) at real tokens (``token_mask`` (batch, seq))."""
        mask = token_mask.to(x.device).bool()
        if x.dim() == 2:  # (batch*seq, n): some families (OPT) flatten tokens before the MLP
            mask = mask.reshape(-1)
        rows = x[mask].reshape(-1, self.units * self.width).to(self.sum.device, _F64)
        ok = torch.isfinite(rows.sum(-1))  # (tokens,): a row is finite iff its float64 sum is
        if not bool(ok.all()):
            self.dropped += int((~ok).sum())
            rows = rows[ok]
        if rows.shape[0] == 0:
            return
        self.count += rows.shape[0]
        self.sum += rows.sum(0).reshape(self.units, self.width)
        self.sq_sum += rows.square().sum(0).reshape(self.units, self.width)
        if self.kind == "full":
            self.gram.addmm_(rows.T, rows)  # (n, n)
        elif self.kind == "unit":
            blocks = rows.reshape(-1, self.units, self.width)  # (tokens, units, width)
            self.gram += torch.einsum("tui,tuj->uij", blocks, blocks)

    @property
    def mean(self) -> torch.Tensor:
        """(units, width) mean of each column over the tokens used."""
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """(units, width) variance of each column over the tokens used (population)."""
        return (self.sq_sum / max(self.count, 1) - self.mean.square()).clamp(min=0)

    @property
    def col_norm(self) -> torch.Tensor:
        """(units, width) ``||x_j||_2`` over the tokens used, per column."""
        return self.sq_sum.sqrt()

    @property
    def sq_norm(self) -> torch.Tensor:
        """(units,) ``sum_t ||x_{t,u}||^2``: each unit's input energy."""
        return self.sq_sum.sum(-1)


def grouped(weight: torch.Tensor, width: int) -> torch.Tensor:
    """A projection's weight (out, units*width) as (out, units, width), columns grouped by unit."""
    return weight.reshape(weight.shape[0], -1, width)


@dataclass
class LayerStats:
    """The statistics of one layer. ``heads`` / ``neurons`` are the accumulators (by default
    :class:`UnitSums`) of the output / down projection's input, None when the layer has no
    such units left or they were not asked for; ``inputs`` is what ``inputs=`` computed on the
    hidden states entering the layer (None if not asked)."""

    layer: int
    attn: AttnParts
    mlp: MlpParts
    heads: Any = None
    neurons: Any = None
    inputs: Any = None
    _keep: dict[str, list[int] | None] = field(default_factory=lambda: {"heads": None, "neurons": None})

    @property
    def head_width(self) -> int:
        """Columns per attention unit: ``group * head_dim``."""
        return self.attn.head_dim * self.attn.group

    def head_weight(self) -> torch.Tensor:
        """The output projection's weight grouped by unit: (hidden, units, group*head_dim)."""
        return grouped(self.attn.o.weight.detach(), self.head_width)

    def neuron_weight(self) -> torch.Tensor:
        """The down projection's weight grouped by neuron: (hidden, neurons, 1)."""
        return grouped(self.mlp.out.weight.detach(), 1)

    def keep(self, heads: list[int] | None = None, neurons: list[int] | None = None) -> None:
        """Sequential methods: the units of this layer that stay (None: all). The next layer is
        then measured with the others masked to zero, as if already removed."""
        self._keep = {"heads": heads, "neurons": neurons}


def layer_stats(adapter: Adapter, calib: CalibrationData, *, gram: str = "none", sequential: bool = False,
                heads: bool = True, neurons: bool = True, device: torch.device | str | None = None,
                accumulator: Callable[[str, int, int, int], Accumulator] | None = None,
                inputs: Callable[[list[torch.Tensor], list[torch.Tensor]], Any] | None = None,
                track: Track = untracked, stream_options: dict[str, Any] | None = None,
                skip: Callable[[int], bool] | None = None) -> Iterator[LayerStats]:
    """Yield :class:`LayerStats` for every layer in order (see the module docstring).

    gram: what :class:`UnitSums` keeps besides sums (``"none"``, ``"unit"`` blocks, ``"full"``).
    sequential: measure layer ``l + 1`` on the outputs of layer ``l`` as the loop body left it
        (two forwards per layer); else one forward per layer on the unchanged model.
    heads / neurons: which projections to measure.
    accumulator: ``accumulator(kind, layer, units, width)`` -> an object with
        ``update(x, token_mask)`` (``kind`` is ``"heads"`` or ``"neurons"``); default UnitSums.
    inputs: ``inputs(hidden, token_masks)`` on the per-batch hidden states (batch, seq, hidden)
        entering the layer and their (batch, seq) masks, before it runs; result in ``.inputs``.
    track: ``ctx.track`` for a progress bar over the layers.
    stream_options: :class:`LayerStream` keywords (``ctx.stream_options()``: layer offload, where the
        hidden states live); default: layers on ``device``.
    skip: ``skip(layer)`` True: that layer is run without statistics and not yielded (a resumed
        prune that already has its results); not with ``sequential``.
    """
    if skip is not None and sequential:
        raise ValueError("layer_stats: skip= needs the non-sequential walk (a skipped layer has no keep())")
    stream = LayerStream(adapter, calib, **(stream_options or {"device": device}))
    dev = stream.device
    make = accumulator or (lambda kind, layer, units, width: UnitSums(units, width, gram=gram, device=dev))
    n_layers = adapter.num_layers
    for layer in track(range(n_layers), desc="layers"):
        if skip is not None and skip(layer):
            if layer < n_layers - 1:
                stream.advance()  # the same forward as with statistics: identical inputs for the next layer
            continue
        attn, mlp = adapter.attn(layer), adapter.mlp(layer)
        width = attn.head_dim * attn.group
        st = LayerStats(layer, attn, mlp,
                        heads=make("heads", layer, attn.units, width) if heads and attn.units else None,
                        neurons=make("neurons", layer, mlp.neurons, 1) if neurons and mlp.neurons else None)
        if inputs is not None:
            st.inputs = inputs(stream.hidden, stream.token_masks)
        last = layer == n_layers - 1
        with ExitStack() as stack:
            for module, acc in ((attn.o, st.heads), (mlp.out, st.neurons)):
                if acc is not None:
                    stack.enter_context(stream.capture(module, acc.update))
            if sequential or last:
                stream.run()
            else:
                stream.advance()
        yield st
        if sequential and not last:
            with soft_masks(adapter, *_masks(adapter, layer, st._keep, dev)):
                stream.advance()
    stream.release()  # layer offload: the last layer goes back to the host


def _masks(adapter: Adapter, layer: int, keep: dict[str, list[int] | None],
           device: torch.device) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    n = adapter.num_layers
    hm: list[torch.Tensor | None] = [None] * n
    nm: list[torch.Tensor | None] = [None] * n
    for masks, key, units in ((hm, "heads", adapter.attn(layer).units), (nm, "neurons", adapter.mlp(layer).neurons)):
        if keep[key] is not None and units:
            masks[layer] = torch.zeros(units, device=device)
            masks[layer][torch.as_tensor(keep[key], dtype=torch.long, device=device)] = 1.0
    return hm, nm


# -- per-channel views (Wanda-sp, FLAP) -------------------------------------------------------
@dataclass
class ChannelStats:
    """One projection's input statistics per channel (column): what Wanda-sp and FLAP read."""

    sum: torch.Tensor  # (channels,) float64: sum of x_j over real tokens
    sumsq: torch.Tensor  # (channels,) float64: sum of x_j^2 over real tokens
    tokens: int = 0
    sequences: int = 0  # calibration sequences seen (Wanda's reference code divides by it)

    @classmethod
    def of(cls, acc: UnitSums | None, channels: int, sequences: int) -> "ChannelStats":
        """The per-channel view of a :class:`UnitSums` (zeros for a projection without units)."""
        if acc is None:
            return cls(torch.zeros(channels, dtype=_F64), torch.zeros(channels, dtype=_F64), 0, sequences)
        return cls(acc.sum.reshape(-1).cpu(), acc.sq_sum.reshape(-1).cpu(), acc.count, sequences)

    @property
    def mean(self) -> torch.Tensor:
        """(channels,) mean over tokens."""
        return self.sum / max(self.tokens, 1)

    @property
    def var(self) -> torch.Tensor:
        """(channels,) population variance over tokens (clamped at 0 against rounding)."""
        return (self.sumsq / max(self.tokens, 1) - self.mean.square()).clamp_min(0)


def output_input_stats(adapter: Adapter, calib: CalibrationData, *, device: torch.device | str | None = None,
                       track: Track = untracked, stream_options: dict[str, Any] | None = None,
                       ) -> tuple[list[ChannelStats], list[ChannelStats]]:
    """(attention, mlp): per layer the per-channel statistics of the inputs of the attention
    output projection (units*group*head_dim channels) and of the down projection (neurons), on
    the model as it is (dense statistics), through :func:`layer_stats`."""
    attn, mlp = [], []
    for st in layer_stats(adapter, calib, device=device, track=track, stream_options=stream_options):
        attn.append(ChannelStats.of(st.heads, st.attn.o.in_features, calib.n_examples))
        mlp.append(ChannelStats.of(st.neurons, st.mlp.out.in_features, calib.n_examples))
    return attn, mlp
