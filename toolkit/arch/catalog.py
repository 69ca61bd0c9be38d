"""What the adapters cover, as plain data (no torch import: ``harness plugins`` stays instant).

:data:`FAMILIES` lists each adapter family with its ``config.model_type`` values and what is
particular to it; :data:`UNSUPPORTED` the model types that are refused, with the reason.
``tests/test_families.py`` checks that this table matches the adapters in ``families.py``.
"""
from __future__ import annotations

FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "bert": (("bert", "roberta", "xlm-roberta", "electra", "camembert"), "post-norm encoders"),
    "deberta-v2": (("deberta-v2",), "DeBERTa-v2/v3 disentangled attention: position projections lose the "
                                    "removed heads' rows; c2p/p2c terms in the FLOPs model"),
    "distilbert": (("distilbert",), "post-norm encoder"),
    "modernbert": (("modernbert",), "fused Wqkv, GLU Wi, local/global layers"),
    "llama": (("llama", "mistral", "qwen2", "qwen3"), "GQA units = KV groups, gated MLP, Qwen3 per-head q/k norms"),
    "gemma": (("gemma", "gemma2", "gemma3_text"), "GQA/MQA, sliding-window + global layers, sandwich norms, "
                                                  "soft-capping"),
    "phi3": (("phi3",), "fused qkv_proj and gate_up_proj"),
    "gpt2": (("gpt2",), "Conv1D (transposed) weights, fused c_attn"),
    "gpt_neox": (("gpt_neox",), "per-head interleaved query_key_value, parallel residual, partial rotary"),
    "opt": (("opt",), "pre/post-norm decoder, ReLU MLP"),
    "moe": (("mixtral", "qwen2_moe", "qwen3_moe"), "mixture-of-experts: neurons per expert, the same count in every "
                                                   "expert of a layer; FLOPs count the top-k experts run per token; "
                                                   "Qwen2-MoE's shared expert kept whole"),
}

GENERIC_NOTE = ("other decoders with q_proj/k_proj/v_proj/o_proj attention and a gate/up/down (or up/down) "
                "MLP: generic adapter, with a warning and a run-time masked == pruned check")


#: model types that look supportable but are not, and why (shown by ``get_adapter`` / ``harness prune``)
UNSUPPORTED: dict[str, str] = {
    "gemma3": "Gemma 3 with its vision tower (Gemma3ForConditionalGeneration) is not supported; load the text "
              "model (model_type 'gemma3_text', Gemma3ForCausalLM), which is",
}


def architecture_rows() -> list[dict[str, str]]:
    """One row per family and per refused model type, for ``harness plugins``."""
    rows = [{"family": f, "model types": ", ".join(types), "structured pruning": "yes", "notes": note}
            for f, (types, note) in FAMILIES.items()]
    rows.append({"family": "generic", "model types": "(any other)", "structured pruning": "checked at run time",
                 "notes": GENERIC_NOTE})
    rows += [{"family": "-", "model types": t, "structured pruning": "no", "notes": why}
             for t, why in sorted(UNSUPPORTED.items())]
    return rows
