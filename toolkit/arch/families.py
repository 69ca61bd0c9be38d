"""Adapters for the supported families, and :func:`get_adapter`.

Supported: BERT-style encoders (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT),
DistilBERT, the Llama family (Llama-2/3, Mistral, Qwen2: grouped-query attention,
gated MLP), and OPT decoders. Hugging Face attention modules infer the head count from the projection
shapes (``view(..., -1, head_dim)``), so removing rows/columns is all surgery needs,
except when a layer loses every unit (see :class:`EmptyAttention`).

Grouped-query attention: the attention *unit* is one KV group, i.e. one key/value head
together with the ``num_attention_heads / num_key_value_heads`` query heads that share it.
Removing a unit removes the K/V head and all of its query heads, so every pruned layer is
still a valid GQA layer with the original group size (``num_key_value_groups`` unchanged),
whatever the number of groups it keeps. For multi-head attention a unit is one head.
"""
from __future__ import annotations

from torch import nn

from .base import Adapter, AttnParts, EmptyAttention, MlpParts


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
    model_types = ("llama", "mistral", "qwen2")
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
        return AttnParts(a.q_proj, a.k_proj, a.v_proj, a.o_proj, d, g)

    def mlp(self, layer: int) -> MlpParts:
        m = self.layers()[layer].mlp
        return MlpParts([m.gate_proj, m.up_proj], m.down_proj)

    def empty_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        block.self_attn = EmptyAttention(block.self_attn.o_proj, "o_proj")


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


ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, DistilBertAdapter, LlamaAdapter, OptAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (any head: base model, classifier, QA, causal LM)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise ValueError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); "
        f"supported model types: {', '.join(supported_model_types())}"
    )
