"""Shared fixtures: tiny randomly initialised models of every supported family."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FAMILIES = ("bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "opt")


def tiny_model(family: str, head: str = "base", seed: int = 0):
    """A tiny random model; Llama-family ones use grouped-query attention (4 q / 2 kv)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=97, max_position_embeddings=64)
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
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        cfg = cls(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, **common)
    auto = {
        "base": tf.AutoModel,
        "causal-lm": tf.AutoModelForCausalLM,
        "sequence-classification": tf.AutoModelForSequenceClassification,
    }[head]
    if head == "sequence-classification":
        cfg.num_labels = 2
        cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    model = auto.from_config(cfg)
    model.eval()
    return model


def tiny_batches(family: str, n_batches: int = 2, batch: int = 3, seq: int = 12, labels: str | None = None,
                 seed: int = 0):
    """Random token batches with some padding (encoders) or full windows (decoders)."""
    from tshrink.calibration import CalibrationData

    g = torch.Generator().manual_seed(seed)
    causal = family in ("llama", "mistral", "qwen2", "opt")
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


@pytest.fixture(autouse=True, scope="session")
def _latency_tables_in_a_temporary_cache(tmp_path_factory):
    """Latency tables that tests measure go to a session directory, never the user's cache."""
    old = os.environ.get("TSHRINK_LATENCY_CACHE")
    os.environ["TSHRINK_LATENCY_CACHE"] = str(tmp_path_factory.mktemp("latency-tables"))
    yield
    if old is None:
        os.environ.pop("TSHRINK_LATENCY_CACHE", None)
    else:
        os.environ["TSHRINK_LATENCY_CACHE"] = old
