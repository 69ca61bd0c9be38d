"""Adapters for the supported families, and :func:`get_adapter`.

Supported: BERT-style encoders (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT), DeBERTa-v2/v3,
DistilBERT, the Llama family (Llama-2/3, Mistral, Qwen2, Qwen3: grouped-query attention,
gated MLP; Qwen3's per-head q/k RMSNorms act over ``head_dim`` and need no change), Gemma /
Gemma 2 / Gemma 3 text (sandwich norms, GQA or MQA, sliding-window and global layers),
Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``), GPT-2 (``Conv1D``, fused ``c_attn``),
GPT-NeoX / Pythia (per-head interleaved ``query_key_value``, parallel residual), OPT
decoders, and ModernBERT encoders (fused ``Wqkv`` and GLU ``Wi``, local / global layers).
Other decoders of the common layout get the generic adapter of :mod:`.generic`. Hugging
Face attention modules infer the head count from the projection shapes
(``view(..., -1, head_dim)``), so removing rows/columns is all surgery needs, except when
a layer loses every unit (see :class:`EmptyAttention`) and where noted per adapter.

Grouped-query attention: the attention *unit* is one KV group, i.e. one key/value head
together with the ``num_attention_heads / num_key_value_heads`` query heads that share it.
Removing a unit removes the K/V head and all of its query heads, so every pruned layer is
still a valid GQA layer with the original group size (``num_key_value_groups`` unchanged),
whatever the number of groups it keeps. For multi-head attention a unit is one head.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Adapter, AttnParts, EmptyAttention, MlpParts, Proj
from .catalog import UNSUPPORTED


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "electra", "camembert")

    def layers(self) -> nn.ModuleList:
        return self.backbone().encoder.layer

    def _head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def attn(self, layer: int) -> AttnParts:
        att = self.layers()[layer].attention
        s = att.self
        if isinstance(s, EmptyAttention):
            return AttnParts(None, None, None, att.output.dense, self._head_dim(), 1)
        return AttnParts(s.query, s.key, s.value, att.output.dense, s.attention_head_size, 1)

    def mlp(self, layer: int) -> MlpParts:
        block = self.layers()[layer]
        return MlpParts([block.intermediate.dense], block.output.dense)

    def empty_attention(self, layer: int) -> None:
        # The output projection lives outside `attention.self` (in BertSelfOutput).
        self.layers()[layer].attention.self = EmptyAttention(None, None)

    def update_attn_attrs(self, layer: int, units: int) -> None:
        s = self.layers()[layer].attention.self
        if not isinstance(s, EmptyAttention):
            s.num_attention_heads = units
            s.all_head_size = units * s.attention_head_size

    def norm_macs_per_token(self) -> tuple[int, int]:
        # fvcore counts LayerNorm as 5 flops per element; two per layer, one after embeddings.
        return 2 * 5 * self.hidden_size, 5 * self.hidden_size


class DebertaV2Adapter(BertAdapter):
    """DeBERTa-v2 / v3: the BERT layout with disentangled attention. The relative-position
    embeddings (``R = 2 * att_span`` rows, shared by all layers) are projected per layer by
    ``query_proj`` / ``key_proj`` (``share_att_key``, v3) or by ``pos_query_proj`` /
    ``pos_key_proj``, one ``head_dim`` block of rows per head, so removing a head removes
    its rows there too; content-to-position and position-to-content scores cost
    ``seq * R * head_dim`` each per head. The position projections run once per batch, so
    the per-sequence count is exact for one sequence (as fvcore measures) and an upper
    bound for larger batches."""

    family = "deberta-v2"
    model_types = ("deberta-v2",)

    def _self(self, layer: int) -> nn.Module:
        return self.layers()[layer].attention.self

    def attn(self, layer: int) -> AttnParts:
        att = self.layers()[layer].attention
        s = att.self
        d = getattr(self.config, "attention_head_size", None) or self._head_dim()
        if isinstance(s, EmptyAttention):
            return AttnParts(None, None, None, att.output.dense, d, 1)
        return AttnParts(s.query_proj, s.key_proj, s.value_proj, att.output.dense, s.attention_head_size, 1)

    def extra_head_projs(self, layer: int) -> list[nn.Linear | Proj]:
        s = self._self(layer)
        return [p for p in (getattr(s, "pos_key_proj", None), getattr(s, "pos_query_proj", None)) if p is not None]

    def update_attn_attrs(self, layer: int, units: int) -> None:
        s = self._self(layer)
        if not isinstance(s, EmptyAttention):
            s.num_attention_heads = units
            s.all_head_size = units * s.attention_head_size

    def _relative(self) -> tuple[int, list[str], bool] | None:
        c = self.config
        if not getattr(c, "relative_attention", False):
            return None
        buckets = getattr(c, "position_buckets", -1)
        span = buckets if buckets > 0 else (c.max_relative_positions if c.max_relative_positions >= 1
                                             else c.max_position_embeddings)
        return 2 * span, list(c.pos_att_type or []), bool(getattr(c, "share_att_key", False))

    def extra_macs(self, layer: int, seq_len: int) -> tuple[int, int]:
        rel = self._relative()
        if rel is None:
            return 0, 0
        R, types, shared = rel
        d, h = self.attn(layer).head_dim, self.hidden_size
        projections = 2 if shared else sum(t in types for t in ("c2p", "p2c"))
        scores = sum(t in types for t in ("c2p", "p2c"))
        return projections * R * h * d + scores * seq_len * R * d, 0

    def outside_extra_macs(self, seq_len: int) -> int:
        rel = self._relative()
        if rel is None or "layer_norm" not in str(getattr(self.config, "norm_rel_ebd", "none")).lower():
            return 0
        return 5 * rel[0] * self.hidden_size  # LayerNorm of the relative embeddings, once per forward


class DistilBertAdapter(Adapter):
    family = "distilbert"
    model_types = ("distilbert",)

    @property
    def hidden_size(self) -> int:
        return int(self.config.dim)

    def layers(self) -> nn.ModuleList:
        return self.backbone().transformer.layer

    def attn(self, layer: int) -> AttnParts:
        a = self.layers()[layer].attention
        d = self.config.dim // self.config.n_heads
        if isinstance(a, EmptyAttention):
            return AttnParts(None, None, None, a.out_lin, d, 1)
        return AttnParts(a.q_lin, a.k_lin, a.v_lin, a.out_lin, d, 1)

    def mlp(self, layer: int) -> MlpParts:
        ffn = self.layers()[layer].ffn
        return MlpParts([ffn.lin1], ffn.lin2)

    def empty_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.attention = EmptyAttention(block.attention.out_lin, "out_lin")

    def update_attn_attrs(self, layer: int, units: int) -> None:
        a = self.layers()[layer].attention
        if not isinstance(a, EmptyAttention):
            a.n_heads = units

    def norm_macs_per_token(self) -> tuple[int, int]:
        return 2 * 5 * self.hidden_size, 5 * self.hidden_size


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    gated_mlp = True
    causal = True

    def layers(self) -> nn.ModuleList:
        return self.backbone().layers

    def _dims(self) -> tuple[int, int]:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return head_dim, c.num_attention_heads // c.num_key_value_heads

    def attn(self, layer: int) -> AttnParts:
        a = self.layers()[layer].self_attn
        d, g = self._dims()
        if isinstance(a, EmptyAttention):
            return AttnParts(None, None, None, a.o_proj, d, g)
        g = a.q_proj.out_features // max(a.k_proj.out_features, 1)  # query heads per KV head, now
        return AttnParts(a.q_proj, a.k_proj, a.v_proj, a.o_proj, d, g)

    def mlp(self, layer: int) -> MlpParts:
        m = self.layers()[layer].mlp
        return MlpParts([m.gate_proj, m.up_proj], m.down_proj)

    def empty_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.self_attn = EmptyAttention(block.self_attn.o_proj, "o_proj")

    def update_attn_attrs(self, layer: int, units: int) -> None:
        a = self.layers()[layer].self_attn
        if not isinstance(a, EmptyAttention):
            a.num_key_value_groups = self.attn(layer).group  # repeat_kv / SDPA's GQA packing read it


class OptAdapter(Adapter):
    """OPT decoders (pre- or post-norm; ReLU MLP ``fc1``/``fc2``; multi-head attention)."""

    family = "opt"
    model_types = ("opt",)
    causal = True

    def backbone(self) -> nn.Module:
        return getattr(self.model, "base_model", self.model)

    def layers(self) -> nn.ModuleList:
        return self.backbone().decoder.layers

    def _head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def attn(self, layer: int) -> AttnParts:
        a = self.layers()[layer].self_attn
        if isinstance(a, EmptyAttention):
            return AttnParts(None, None, None, a.out_proj, self._head_dim(), 1)
        return AttnParts(a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.head_dim, 1)

    def mlp(self, layer: int) -> MlpParts:
        block = self.layers()[layer]
        return MlpParts([block.fc1], block.fc2)

    def empty_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.self_attn = EmptyAttention(block.self_attn.out_proj, "out_proj")

    def update_attn_attrs(self, layer: int, units: int) -> None:
        a = self.layers()[layer].self_attn
        if not isinstance(a, EmptyAttention):
            a.num_heads = units  # OPT's forward reshapes with num_heads, not -1

    def norm_macs_per_token(self) -> tuple[int, int]:
        # two LayerNorms per layer; the decoder's final LayerNorm (if any) outside the layers
        final = 5 * self.hidden_size if getattr(self.backbone().decoder, "final_layer_norm", None) is not None else 0
        return 2 * 5 * self.hidden_size, final


class GemmaAdapter(LlamaAdapter):
    """Gemma, Gemma 2 and Gemma 3 (text): the Llama layout with ``head_dim`` set in the
    config, GELU-tanh gated MLP, and (Gemma 2/3) a norm after each sub-layer before the
    residual add. Pruning leaves the norms, the embedding scale and the soft-capping alone:
    a pruned sub-layer's output is still normalised the same way, and a fully pruned
    attention outputs zeros, which the post-norm keeps at zero."""

    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")


class Phi3Adapter(LlamaAdapter):
    """Phi-3: ``qkv_proj`` holds Q, K and V rows in three blocks, ``gate_up_proj`` the gate
    then the up rows; both are viewed per block and sliced together."""

    family = "phi3"
    model_types = ("phi3",)
    gated_mlp = True
    causal = True

    def attn(self, layer: int) -> AttnParts:
        a = self.layers()[layer].self_attn
        d, g = self._dims()
        if isinstance(a, EmptyAttention):
            return AttnParts(None, None, None, a.o_proj, d, g)
        nq = a.o_proj.in_features  # units * g * d
        nkv = (a.qkv_proj.out_features - nq) // 2  # units * d
        g = nq // max(nkv, 1)
        qkv = a.qkv_proj
        return AttnParts(Proj(qkv, rows=slice(0, nq)), Proj(qkv, rows=slice(nq, nq + nkv)),
                         Proj(qkv, rows=slice(nq + nkv, nq + 2 * nkv)), a.o_proj, d, g)

    def mlp(self, layer: int) -> MlpParts:
        m = self.layers()[layer].mlp
        n = m.down_proj.in_features
        return MlpParts([Proj(m.gate_up_proj, rows=slice(0, n)), Proj(m.gate_up_proj, rows=slice(n, 2 * n))],
                        m.down_proj)

    def update_attn_attrs(self, layer: int, units: int) -> None:
        a = self.layers()[layer].self_attn
        if isinstance(a, EmptyAttention):
            return
        g = self.attn(layer).group
        # Phi3Attention splits qkv at ``self.config.num_attention_heads * head_dim``: the
        # module gets its own copy of the config with this layer's head counts (the model's
        # config, which is what is saved, keeps the dense ones).
        if a.config is self.config:
            a.config = copy.copy(self.config)
        a.config.num_attention_heads = units * g
        a.config.num_key_value_heads = units
        a.num_key_value_heads = units
        a.num_key_value_groups = g


class Gpt2Adapter(Adapter):
    """GPT-2: ``Conv1D`` projections (weights stored ``(in, out)``), Q/K/V fused in
    ``c_attn`` as three blocks, LayerNorm before each sub-layer and after the last layer."""

    family = "gpt2"
    model_types = ("gpt2",)
    causal = True

    @property
    def hidden_size(self) -> int:
        return int(self.config.n_embd)

    def layers(self) -> nn.ModuleList:
        return self.backbone().h

    def _head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head

    def attn(self, layer: int) -> AttnParts:
        a = self.layers()[layer].attn
        d = self._head_dim()
        o = Proj(a.c_proj, transposed=True)
        if isinstance(a, EmptyAttention):
            return AttnParts(None, None, None, o, d, 1)
        n = o.in_features
        qkv = a.c_attn
        return AttnParts(Proj(qkv, transposed=True, rows=slice(0, n)), Proj(qkv, transposed=True, rows=slice(n, 2 * n)),
                         Proj(qkv, transposed=True, rows=slice(2 * n, 3 * n)), o, d, 1)

    def mlp(self, layer: int) -> MlpParts:
        m = self.layers()[layer].mlp
        return MlpParts([Proj(m.c_fc, transposed=True)], Proj(m.c_proj, transposed=True))

    def empty_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.attn = EmptyAttention(block.attn.c_proj, "c_proj")

    def update_attn_attrs(self, layer: int, units: int) -> None:
        a = self.layers()[layer].attn
        if not isinstance(a, EmptyAttention):
            a.split_size = units * a.head_dim  # c_attn's output is split into Q, K, V by this
            a.num_heads = units
            a.embed_dim = units * a.head_dim

    def norm_macs_per_token(self) -> tuple[int, int]:
        return 2 * 5 * self.hidden_size, 5 * self.hidden_size


class GptNeoXAdapter(Adapter):
    """GPT-NeoX / Pythia: ``query_key_value`` holds, per head, its Q, K and V rows next to
    each other (``view(..., heads, 3 * head_dim)``), so a head's rows are interleaved and
    the views are index sets; attention and MLP may run in parallel on the same input
    (``use_parallel_residual``); rotary over the first ``rotary_ndims`` of each head."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)
    causal = True

    def layers(self) -> nn.ModuleList:
        return self.backbone().layers

    def _head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def attn(self, layer: int) -> AttnParts:
        a = self.layers()[layer].attention
        d = self._head_dim()
        if isinstance(a, EmptyAttention):
            return AttnParts(None, None, None, a.dense, d, 1)
        units = a.dense.in_features // d
        base = (torch.arange(units) * 3 * d).reshape(-1, 1)  # first row of each head's block
        rows = [(base + part * d + torch.arange(d)).flatten() for part in range(3)]  # (units*d,) each
        qkv = a.query_key_value
        return AttnParts(Proj(qkv, rows=rows[0]), Proj(qkv, rows=rows[1]), Proj(qkv, rows=rows[2]), a.dense, d, 1)

    def mlp(self, layer: int) -> MlpParts:
        m = self.layers()[layer].mlp
        return MlpParts([m.dense_h_to_4h], m.dense_4h_to_h)

    def empty_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.attention = EmptyAttention(block.attention.dense, "dense")

    def norm_macs_per_token(self) -> tuple[int, int]:
        return 2 * 5 * self.hidden_size, 5 * self.hidden_size


class ModernBertAdapter(Adapter):
    """ModernBERT encoders: ``Wqkv`` holds the Q, K and V rows in three blocks, the GLU
    MLP's ``Wi`` the input then the gate rows; pre-norm layers (the first without attention
    norm), alternating local (sliding-window) and global attention."""

    family = "modernbert"
    model_types = ("modernbert",)
    gated_mlp = True

    def layers(self) -> nn.ModuleList:
        return self.backbone().layers

    def _head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def attn(self, layer: int) -> AttnParts:
        a = self.layers()[layer].attn
        d = self._head_dim()
        if isinstance(a, EmptyAttention):
            return AttnParts(None, None, None, a.Wo, d, 1)
        n = a.Wo.in_features
        return AttnParts(Proj(a.Wqkv, rows=slice(0, n)), Proj(a.Wqkv, rows=slice(n, 2 * n)),
                         Proj(a.Wqkv, rows=slice(2 * n, 3 * n)), a.Wo, d, 1)

    def mlp(self, layer: int) -> MlpParts:
        m = self.layers()[layer].mlp
        n = m.Wo.in_features
        return MlpParts([Proj(m.Wi, rows=slice(0, n)), Proj(m.Wi, rows=slice(n, 2 * n))], m.Wo)

    def empty_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.attn = EmptyAttention(block.attn.Wo, "Wo")

    def norm_macs_per_token(self) -> tuple[int, int]:
        # LayerNorms: two per layer but none before the first attention, one after the
        # embeddings, one final: 2L + 1 in all, counted as 2 per layer and 1 outside.
        total = sum(isinstance(m, nn.LayerNorm) for m in self.backbone().modules())
        return 2 * 5 * self.hidden_size, (total - 2 * self.num_layers) * 5 * self.hidden_size


from .moe import MoeAdapter  # noqa: E402 - subclasses LlamaAdapter, defined above

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, DebertaV2Adapter, DistilBertAdapter, LlamaAdapter, GemmaAdapter, Phi3Adapter,
                                       Gpt2Adapter, GptNeoXAdapter, OptAdapter, ModernBertAdapter, MoeAdapter)


def supported_model_types() -> list[str]:
    """``config.model_type`` values that have an adapter."""
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def family_of(model_type: str) -> str | None:
    """The adapter family for a ``config.model_type`` (None if unsupported)."""
    return next((cls.family for cls in ADAPTERS if model_type in cls.model_types), None)


def supported_architectures() -> dict[str, str]:
    """Model class name -> adapter family, for every transformers class (any head) of a
    supported model type, as transformers' auto mappings list them (names only: no model
    code is imported)."""
    from transformers.models.auto import modeling_auto

    out: dict[str, str] = {}
    for name in dir(modeling_auto):
        table = getattr(modeling_auto, name)
        if not (name.endswith("_MAPPING_NAMES") and isinstance(table, dict)):
            continue
        for model_type, classes in table.items():
            family = family_of(model_type)
            if family is None:
                continue
            for cls_name in (classes if isinstance(classes, (list, tuple)) else [classes]):
                if not cls_name.endswith("Config"):
                    out[cls_name] = family
    return dict(sorted(out.items()))


def unsupported_reasons() -> dict[str, str]:
    """Known model types without an adapter, with the reason (for ``harness plugins``)."""
    return dict(sorted(UNSUPPORTED.items()))


def architecture_support(config) -> str | None:
    """None when models of ``config`` can be pruned structurally, else the reason (checked
    before any weight is loaded: families without an adapter are built on the meta device
    to look for the generic decoder layout; its numerical check runs on the real model)."""
    model_type = getattr(config, "model_type", None)
    if family_of(model_type) is not None:
        return None
    if model_type in UNSUPPORTED:
        return UNSUPPORTED[model_type]
    from .generic import _find_names

    try:
        import transformers

        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config)
    except Exception as err:  # noqa: BLE001 - no model class at all
        return f"transformers cannot build it ({type(err).__name__}: {err})"
    names = _find_names(model)
    return f"the generic decoder adapter does not apply: {names}" if isinstance(names, str) else None


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (any head: base model, classifier, QA, causal LM).

    Families without their own adapter get the generic decoder adapter when their modules
    follow the common layout and pass its run-time check (with a warning, see
    :mod:`.generic`); anything else is a ValueError naming the reason."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    if model_type in UNSUPPORTED:
        raise ValueError(f"unsupported architecture {model_type!r} ({type(model).__name__}): "
                         f"{UNSUPPORTED[model_type]}")
    from .generic import generic_adapter

    generic = generic_adapter(model) if isinstance(model, nn.Module) else "it is not a torch module"
    if not isinstance(generic, str):
        return generic
    raise ValueError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); "
        f"supported model types: {', '.join(supported_model_types())}; "
        f"the generic decoder adapter does not apply: {generic}"
    )
