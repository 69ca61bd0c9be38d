"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE (transformers 5 layout).

transformers 5 stores a layer's routed experts fused: ``experts.gate_up_proj`` (E, 2I, H)
and ``experts.down_proj`` (E, H, I); the forward reads I from the tensors' shapes, so every
expert of a layer may lose neurons as long as all keep the SAME number ``k_l`` (each its own
choice of which). A layer's MLP is seen as one virtual MLP of ``E * I`` neurons, neuron
``e * I + i`` being neuron ``i`` of expert ``e``: its activation is the routing weight times
the expert's ``act(gate) * up`` on the tokens routed to ``e`` and 0 elsewhere, so the layer's
output is ``down_virtual @ z`` with ``down_virtual`` (H, E*I) the experts' down columns side
by side. Masks and statistics act on ``z``: a 0/1 mask gives exactly the pruned output.

While a hook is registered on the virtual down projection (scoring, masks, calibration
statistics) the block runs :func:`_virtual_forward` (every token gets an (E*I,) activation
row, E / top_k times the routed work); otherwise the model's own forward runs untouched.
Qwen2-MoE's shared expert (a plain gated MLP behind a sigmoid gate) is kept whole here: its
cost is width-independent in the cost model. Whole experts as units (router rows removed)
are not implemented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MlpParts
from .families import LlamaAdapter


class ExpertNeurons(nn.Module):
    """Hook point of the virtual down projection: ``forward(z, weight)`` with ``z``
    (batch, seq, E*I) and ``weight`` (H, E*I). Not a child of the model (no state)."""

    def forward(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(z, weight.to(z.dtype))  # (batch, seq, H)


def _point(block: nn.Module) -> ExpertNeurons:
    point = block.__dict__.get("_tshrink_neurons")
    if point is None:
        point = ExpertNeurons()
        object.__setattr__(block, "_tshrink_neurons", point)  # outside _modules: no checkpoint keys
    return point


def _virtual_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The block's output through the virtual (E*I)-neuron MLP (eval mode: no router jitter)."""
    b, s, h = hidden_states.shape
    flat = hidden_states.reshape(-1, h)  # (tokens, H)
    _, weights, index = block.gate(flat)  # (tokens, top_k) each
    ex = block.experts
    E, n = ex.gate_up_proj.shape[0], ex.down_proj.shape[-1]
    z = flat.new_zeros(flat.shape[0], E, n)
    for e in range(E):
        tok, pos = torch.where(index == e)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(flat[tok], ex.gate_up_proj[e]).chunk(2, dim=-1)
        z = z.index_put((tok, torch.full_like(tok, e)), ex.act_fn(gate) * up * weights[tok, pos, None].to(flat.dtype))
    down = ex.down_proj.permute(1, 0, 2).reshape(h, E * n)  # (H, E*I)
    out = _point(block)(z.reshape(b, s, E * n), down)  # (batch, seq, H)
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        out = out + torch.sigmoid(block.shared_expert_gate(hidden_states)) * shared(hidden_states)
    return out


class _Handle:
    def __init__(self, handle, block: nn.Module) -> None:
        self.handle, self.block = handle, block

    def remove(self) -> None:
        self.handle.remove()
        point = _point(self.block)
        if not (point._forward_pre_hooks or point._forward_hooks) and "forward" in self.block.__dict__:
            del self.block.forward  # back to the model's own forward


def _install(block: nn.Module) -> None:
    if "forward" not in block.__dict__:
        block.forward = lambda hidden_states, *a, **k: _virtual_forward(block, hidden_states)


class ExpertRows:
    """Gate (``part=0``) or up (``part=1``) rows of all experts, ``(E*I, H)`` (a copy: read
    only); hooks go to the MoE block, whose input is these projections' input."""

    read_only = True

    def __init__(self, block: nn.Module, part: int) -> None:
        self.block, self.part = block, part
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        w = self.block.experts.gate_up_proj  # (E, 2I, H)
        n = w.shape[1] // 2
        return w[:, self.part * n:(self.part + 1) * n].reshape(-1, w.shape[-1])

    @property
    def in_features(self) -> int:
        return int(self.block.experts.gate_up_proj.shape[-1])

    @property
    def out_features(self) -> int:
        w = self.block.experts.gate_up_proj
        return int(w.shape[0] * w.shape[1] // 2)

    def register_forward_pre_hook(self, *args, **kwargs):
        return self.block.register_forward_pre_hook(*args, **kwargs)

    def register_forward_hook(self, *args, **kwargs):
        return self.block.register_forward_hook(*args, **kwargs)


class ExpertDown:
    """The virtual down projection ``(H, E*I)``: ``weight`` is a copy (column writes go
    through :meth:`write_columns`); hooks see the virtual activations (batch, seq, E*I)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        d = self.block.experts.down_proj  # (E, H, I)
        return d.permute(1, 0, 2).reshape(d.shape[1], -1)

    @property
    def in_features(self) -> int:
        d = self.block.experts.down_proj
        return int(d.shape[0] * d.shape[2])

    @property
    def out_features(self) -> int:
        return int(self.block.experts.down_proj.shape[1])

    def write_columns(self, cols: torch.Tensor, values: torch.Tensor) -> None:
        """Set virtual columns ``cols`` to ``values`` (H, |cols|) in the experts' down_proj."""
        d = self.block.experts.down_proj
        n = d.shape[2]
        cols = cols.to(d.device).long()
        with torch.no_grad():
            d[cols // n, :, cols % n] = values.t().to(d.device, d.dtype)

    def _hooked(self, handle) -> _Handle:
        _install(self.block)
        return _Handle(handle, self.block)

    def register_forward_pre_hook(self, *args, **kwargs):
        return self._hooked(_point(self.block).register_forward_pre_hook(*args, **kwargs))

    def register_forward_hook(self, *args, **kwargs):
        return self._hooked(_point(self.block).register_forward_hook(*args, **kwargs))


class MoeMlpParts(MlpParts):
    """An MoE layer's routed experts as one virtual MLP of ``experts * per_expert`` neurons."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__([ExpertRows(block, 0), ExpertRows(block, 1)], ExpertDown(block))
        self.block = block

    @property
    def experts(self) -> int:
        return int(self.block.experts.gate_up_proj.shape[0])

    @property
    def per_expert(self) -> int:
        return int(self.block.experts.down_proj.shape[-1])


def _is_moe(block: nn.Module) -> bool:
    return hasattr(block, "experts") and hasattr(block, "gate")


class MoeAdapter(LlamaAdapter):
    """Mixtral, Qwen2-MoE and Qwen3-MoE: Llama attention (GQA; Qwen3-MoE's q/k norms act over
    ``head_dim``); in MoE layers the routed experts' neurons are the MLP units (the same
    count ``k_l`` in every expert of a layer); dense layers (``mlp_only_layers``,
    ``decoder_sparse_step``) are ordinary gated MLPs. The cost model counts, per token, the
    ``top_k`` experts it is routed to (so a kept expert neuron costs ``3 * hidden * top_k / E``
    per token on average, exactly ``k_l * 3 * hidden * top_k`` per token for the layer), the
    router and the shared expert (Qwen2-MoE, kept whole)."""

    family = "moe"
    model_types = ("mixtral", "qwen2_moe", "qwen3_moe")

    def mlp(self, layer: int) -> MlpParts:
        m = self.layers()[layer].mlp
        if _is_moe(m):
            return MoeMlpParts(m)
        return MlpParts([m.gate_proj, m.up_proj], m.down_proj)

    def experts(self, layer: int) -> int | None:
        m = self.layers()[layer].mlp
        return int(m.experts.gate_up_proj.shape[0]) if _is_moe(m) else None

    def top_k(self) -> int:
        return int(self.config.num_experts_per_tok)

    def neuron_macs(self, layer: int, seq_len: int) -> tuple[float, int]:
        m = self.layers()[layer].mlp
        h = self.hidden_size
        if not _is_moe(m):
            return 3 * seq_len * h, 0
        E = self.experts(layer)
        fixed = seq_len * h * E  # the router
        shared = getattr(m, "shared_expert", None)
        if shared is not None:  # the shared expert (kept whole) and its sigmoid gate
            fixed += seq_len * h * (3 * shared.down_proj.in_features + 1)
        per = 3 * seq_len * h * self.top_k()
        return (per // E if per % E == 0 else per / E), fixed

    def first_neurons(self, layer: int, count: int) -> list[int]:
        E = self.experts(layer)
        if E is None:
            return list(range(count))
        n, k = self.mlp(layer).per_expert, count // E
        return [e * n + i for e in range(E) for i in range(k)]

    def prune_mlp(self, layer: int, keep: list[int]) -> None:
        """Keep virtual neurons ``keep`` of an MoE layer (``k`` per expert, see
        :func:`check_expert_counts`): slices gate_up_proj (E, 2k, H) and down_proj (E, H, k).
        transformers' default ``grouped_mm`` experts kernel needs ``k * bytes`` to be a multiple
        of 16 (and k > 0); other widths switch the model to the eager experts implementation."""
        parts = self.mlp(layer)
        E, n = parts.experts, parts.per_expert
        check_expert_counts(keep, E, n, layer)
        k = len(keep) // E
        idx = torch.as_tensor(sorted(keep), dtype=torch.long).reshape(E, k) % n  # (E, k) each expert's own
        ex = parts.block.experts
        gu, d = ex.gate_up_proj, ex.down_proj
        gi = idx.to(gu.device)
        rows = torch.cat([gi, gi + n], dim=1)  # gate rows then up rows, per expert
        new_gu = torch.gather(gu.detach(), 1, rows[:, :, None].expand(E, 2 * k, gu.shape[-1])).clone()
        new_d = torch.gather(d.detach(), 2, gi[:, None, :].expand(E, d.shape[1], k)).clone()
        ex.gate_up_proj = nn.Parameter(new_gu, requires_grad=gu.requires_grad)
        ex.down_proj = nn.Parameter(new_d, requires_grad=d.requires_grad)
        if hasattr(ex, "intermediate_dim"):
            ex.intermediate_dim = k
        impl = getattr(self.config, "_experts_implementation", None)
        if impl not in (None, "eager") and (k == 0 or (k * new_d.element_size()) % 16):
            # the fused grouped_mm kernels need 16-byte aligned rows: this width runs eagerly
            self.config._experts_implementation = "eager"


def check_expert_counts(keep: list[int], experts: int, per_expert: int, layer: int) -> None:
    """ValueError unless every expert keeps the same number of its ``per_expert`` neurons."""
    counts = [0] * experts
    for i in keep:
        counts[int(i) // per_expert] += 1
    if len(set(counts)) > 1:
        raise ValueError(f"selection.neurons[{layer}]: the experts keep {counts} neurons; every expert of a "
                         f"mixture-of-experts layer must keep the same number (transformers stores them as one "
                         f"(experts, neurons, hidden) tensor)")
