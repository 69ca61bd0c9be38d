"""Shared fixtures: tiny randomly initialised models of every supported family."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt",
            "granite", "starcoder2")
#: families without a reviewed adapter, served by the generic decoder adapter
GENERIC = ("granite", "starcoder2")
FAMILIES = ("bert", "roberta", "distilbert", "modernbert", "deberta-v2") + DECODERS


def tiny_model(family: str, head: str = "base", seed: int = 0, vocab_size: int = 97):
    """A tiny random model; Llama-family ones use grouped-query attention (4 q / 2 kv).

    The newer families exercise what is particular to them: Qwen3 a ``head_dim`` unrelated
    to ``hidden / heads``; Gemma 2 alternating sliding-window (4 tokens, shorter than the test
    sequences) and global layers with soft-capping; Gemma 3 multi-query attention (one KV
    head) and q/k norms; GPT-NeoX partial rotary and the parallel residual."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, max_position_embeddings=64)
    if family in ("bert", "roberta"):
        cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
        cfg = cls(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                  pad_token_id=1, **common)
        if family == "roberta":
            cfg.max_position_embeddings = 80
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=48, **common)
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
                           word_embed_proj_dim=32, **common)
    elif family == "deberta-v2":  # v3 layout: shared position keys, both disentangled terms, log buckets
        cfg = tf.DebertaV2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                                 relative_attention=True, position_buckets=8, max_relative_positions=-1,
                                 pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                                 position_biased_input=False, pad_token_id=0, **common)
    elif family == "modernbert":  # alternating local (4-token window) and global attention
        cfg = tf.ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                                  local_attention=4, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, cls_token_id=1, sep_token_id=2, **common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=64, vocab_size=vocab_size,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                               rotary_pct=0.5, use_parallel_residual=True, attention_bias=True, pad_token_id=0,
                               **common)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8, intermediate_size=48, sliding_window=4, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, query_pre_attn_scalar=8, pad_token_id=0, **common)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=8, intermediate_size=48, sliding_window=4, query_pre_attn_scalar=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  pad_token_id=0, **common)
    elif family == "granite":  # Llama layout with residual / attention / logit multipliers
        cfg = tf.GraniteConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=48, residual_multiplier=0.5, attention_multiplier=0.3,
                               embedding_multiplier=2.0, pad_token_id=0, **common)
    elif family == "starcoder2":  # LayerNorms, biases, plain c_fc / c_proj MLP
        cfg = tf.Starcoder2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=48, bos_token_id=1, eos_token_id=2, **common)
    elif family == "phi3":
        cfg = tf.Phi3Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config}[family]
        extra = {"head_dim": 16} if family == "qwen3" else {}
        cfg = cls(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, **extra, **common)
    auto = {
        "base": tf.AutoModel,
        "causal-lm": tf.AutoModelForCausalLM,
        "sequence-classification": tf.AutoModelForSequenceClassification,
    }[head]
    if head == "sequence-classification":
        cfg.num_labels = 2
        cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = auto.from_config(cfg)
    model.eval()
    return model


def tiny_batches(family: str, n_batches: int = 2, batch: int = 3, seq: int = 12, labels: str | None = None,
                 seed: int = 0):
    """Random token batches with some padding (encoders) or full windows (decoders)."""
    from tshrink.calibration import CalibrationData

    g = torch.Generator().manual_seed(seed)
    causal = family in DECODERS
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, 97, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if not causal:
            mask[0, seq - 4:] = 0  # one padded row
        b = {"input_ids": ids, "attention_mask": mask}
        if labels == "lm":
            b["labels"] = ids.clone()
        elif labels == "class":
            b["labels"] = torch.randint(0, 2, (batch,), generator=g)
        out.append(b)
    return CalibrationData(out, source="random-tokens")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def data_dir() -> Path:
    """The real benchmark data (../shared/data or $TSHRINK_DATA_DIR); skip when absent."""
    path = Path(os.environ.get("TSHRINK_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set TSHRINK_DATA_DIR)")
    return path.resolve()
