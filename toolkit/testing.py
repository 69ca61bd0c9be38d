"""Test kit for plugin authors: tiny models, tokenizers and calibration data of every supported
family, and :func:`check_method`, the contract every built-in method passes.

A plugin repository tests itself with one line::

    from tshrink.testing import check_method

    def test_contract():
        check_method("my-method")            # installed plugin (entry point)
        # or: check_method("my-method", plugins=[my_plugin_module])  # not installed

Everything here is offline (random weights, tokenizers built from a word list in
milliseconds) and small enough for a CPU test run in seconds.
"""
from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

#: Families with an adapter (and two served by the generic decoder adapter); Llama-style ones use
#: grouped-query attention (4 query / 2 KV heads), Gemma 3 multi-query attention (one KV head).
#: mixture-of-experts decoders (4 experts of 24 neurons, top-2 routing; Qwen2-MoE with a shared expert
#: and a dense middle layer)
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt",
            "granite", "starcoder2") + MOE
#: families without a reviewed adapter, served by the generic decoder adapter
GENERIC = ("granite", "starcoder2")
FAMILIES = ("bert", "roberta", "distilbert", "modernbert", "deberta-v2") + DECODERS
CAUSAL = DECODERS
HEADS = ("base", "causal-lm", "sequence-classification")

#: A little text for tokenizers and text calibration data.
TINY_TEXT = ("the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
             "every cloud has a silver lining . pruning keeps the units that matter most . ")
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CAUSAL_SPECIALS = ["<|endoftext|>", "<pad>"]  # id 0 is eos/bos, id 1 is pad


# -- models ----------------------------------------------------------------------------------
def tiny_model(family: str, head: str = "base", seed: int = 0, vocab_size: int = 97) -> Any:
    """A tiny random model of ``family`` (3 layers, hidden 32, 4 heads, 48 MLP neurons); ``head``
    one of ``base``, ``causal-lm``, ``sequence-classification`` (2 labels).

    The newer families exercise what is particular to them: Qwen3 a ``head_dim`` unrelated
    to ``hidden / heads``; Gemma 2 alternating sliding-window (4 tokens, shorter than the test
    sequences) and global layers with soft-capping; Gemma 3 multi-query attention (one KV
    head) and q/k norms; GPT-NeoX partial rotary and the parallel residual."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    if head not in HEADS:
        raise ValueError(f"head {head!r} is not one of {HEADS}")
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
    elif family == "mixtral":
        cfg = tf.MixtralConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **common)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], **common)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                num_experts_per_tok=2, norm_topk_prob=True, **common)
    elif family == "phi3":
        cfg = tf.Phi3Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config}[family]
        extra = {"head_dim": 16} if family == "qwen3" else {}
        cfg = cls(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, **extra, **common)
    auto = {"base": tf.AutoModel, "causal-lm": tf.AutoModelForCausalLM,
            "sequence-classification": tf.AutoModelForSequenceClassification}[head]
    if head == "sequence-classification":
        cfg.num_labels = 2
        cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    with warnings.catch_warnings():  # config-level notices of the newer families
        warnings.simplefilter("ignore", UserWarning)
        model = auto.from_config(cfg)
    model.eval()
    return model


def tiny_model_dir(family: str, root: str | Path, head: str | None = None, seed: int = 0) -> Path:
    """A tiny model and a matching tokenizer saved under ``root/<family>`` like a user's model
    directory (``harness prune --model DIR``). ``head`` defaults to ``causal-lm`` for decoders
    and ``sequence-classification`` for encoders."""
    path = Path(root) / f"tiny-{family}"
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(family, path)
    head = head or ("causal-lm" if family in CAUSAL else "sequence-classification")
    tiny_model(family, head, seed=seed, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# -- tokenizers ------------------------------------------------------------------------------
def wordpiece_tokenizer(words: Iterable[str], tmp_dir: str | Path, *, token_types: bool = True) -> Any:
    """BERT-style WordPiece tokenizer over ``words`` (lower-cased; split on whitespace and
    punctuation like BERT's pre-tokenizer). Every single character of the words and of
    a-z/0-9 is also in the vocabulary (plain and as a ``##`` continuation), so unseen ASCII
    words still tokenize into pieces instead of ``[UNK]``. ``vocab.txt`` goes to ``tmp_dir``;
    ``token_types=False`` leaves out ``token_type_ids`` (DistilBERT takes none)."""
    import re

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

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
    extra = {} if token_types else {"model_input_names": ["input_ids", "attention_mask"]}
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", model_max_length=512, **extra,
    )


def byte_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 320) -> Any:
    """Byte-level BPE (GPT-2 style) trained on ``texts``; eos = bos = ``<|endoftext|>`` (id 0),
    pad = ``<pad>`` (id 1). No special tokens are added when encoding, like GPT-2. Being
    byte-level it encodes any string (no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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


def tiny_tokenizer(family: str, tmp_dir: str | Path | None = None) -> Any:
    """A tokenizer for ``family``: byte-level BPE for decoders, WordPiece for encoders (its
    ``vocab.txt`` in ``tmp_dir``, a fresh temporary folder by default)."""
    if family in CAUSAL:
        return byte_bpe_tokenizer([TINY_TEXT * 4])
    return wordpiece_tokenizer([TINY_TEXT], tmp_dir or tempfile.mkdtemp(prefix="tshrink-tok-"),
                               token_types=family != "distilbert")


# -- calibration data ------------------------------------------------------------------------
def tiny_batches(family: str, n_batches: int = 2, batch: int = 3, seq: int = 12, labels: str | None = None,
                 seed: int = 0, vocab_size: int = 97) -> Any:
    """Random token batches (:class:`tshrink.calibration.CalibrationData`) with one padded
    row per batch for encoders and full windows for decoders; ``labels``: None, ``"lm"``
    (next-token ids) or ``"class"`` (2 classes)."""
    from .calibration import CalibrationData

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab_size, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if family not in CAUSAL:
            mask[0, seq - 4:] = 0  # one padded row
        b = {"input_ids": ids, "attention_mask": mask}
        if labels == "lm":
            b["labels"] = ids.clone()
        elif labels == "class":
            b["labels"] = torch.randint(0, 2, (batch,), generator=g)
        out.append(b)
    return CalibrationData(out, source="random-tokens")


def tiny_calibration(family: str, tokenizer: Any, *, seq_len: int = 16, n: int = 6) -> Any:
    """Calibration data tokenised from :data:`TINY_TEXT` with ``tokenizer``: LM windows with
    next-token labels for decoders, padded sentences with 2-class labels for encoders."""
    from .calibration import batches_from_texts, lm_batches_from_text

    if family in CAUSAL:
        return lm_batches_from_text(tokenizer, TINY_TEXT * 8, seq_len=seq_len, n_sequences=n, batch_size=3,
                                    source="tiny-text")
    sentences = [s.strip() for s in TINY_TEXT.split(".") if s.strip()]
    texts = [sentences[i % len(sentences)] for i in range(n)]
    return batches_from_texts(tokenizer, texts, seq_len=seq_len, batch_size=3,
                              labels=[i % 2 for i in range(n)], source="tiny-text")


# -- the contract ----------------------------------------------------------------------------
def contract_setup(family: str, seed: int = 0) -> tuple[Any, Any]:
    """The model and calibration data of the contract: a classifier for encoders (class
    labels), a causal LM for decoders (next-token labels)."""
    causal = family in CAUSAL
    model = tiny_model(family, head="causal-lm" if causal else "sequence-classification", seed=seed)
    return model, tiny_batches(family, labels="lm" if causal else "class")


def _manager(pm: Any, plugins: Iterable[object]) -> Any:
    from .manager import get_plugin_manager

    return pm if pm is not None else get_plugin_manager(plugins=list(plugins))


def _fail(method: str, what: str, detail: str) -> AssertionError:
    return AssertionError(f"method {method!r} breaks the tshrink contract: {what}: {detail}")


def check_prune(method: str, family: str, *, pm: Any = None, plugins: Iterable[object] = (), budget: float = 0.6,
                tmp_dir: str | Path | None = None) -> dict[str, Any]:
    """Prune a tiny ``family`` model at ``budget``: the budget is met (and used: more than half
    of it is kept), parameters shrink, the model still runs, and it saves and reloads to
    identical outputs. Returns the prune report."""
    from .checkpoint import load_pruned, save_pruned
    from .pipeline import prune
    from .registry import Registry

    pm = _manager(pm, plugins)
    spec = Registry(pm).method(method)
    model, calib = contract_setup(family)
    batch = calib.batches[0]
    result = prune(model, method, budget, calib=calib, seed=0, pm=pm)
    rep = result.report
    if spec.recipe.prunes:
        # a select stage with its own budget (latency) meets it itself; FLOPs kept may then differ
        if Registry(pm).stage("select", spec.recipe.select).budget == "flops":
            if rep["flops_kept"] > budget + 1e-9:
                raise _fail(method, f"{family} budget", f"kept {rep['flops_kept']:.4f} of the FLOPs, budget {budget}")
            if rep["flops_kept"] <= budget / 2:
                raise _fail(method, f"{family} budget", f"kept only {rep['flops_kept']:.4f} of the FLOPs at budget "
                            f"{budget}: a selector should use its budget")
        if not rep["params_after"] < rep["params_before"]:
            raise _fail(method, f"{family} size", "the pruned model is not smaller")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if not torch.isfinite(out).all():
        raise _fail(method, f"{family} outputs", "the compressed model produces NaN/inf")
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        save_pruned(model, Path(tmp) / "m", compressed=result.compressed, info={"report": rep})
        again = load_pruned(Path(tmp) / "m", pm=pm)
        with torch.no_grad():
            out2 = again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    try:
        torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    except AssertionError as err:
        raise _fail(method, f"{family} save/reload", f"reloaded outputs differ: {err}") from None
    return rep


def check_deterministic(method: str, *, pm: Any = None, plugins: Iterable[object] = (), family: str = "llama",
                        budget: float = 0.7) -> None:
    """The same seed gives exactly the same compressed model."""
    from .pipeline import prune

    pm = _manager(pm, plugins)
    outs = []
    for _ in range(2):
        model, calib = contract_setup(family)
        prune(model, method, budget, calib=calib, seed=3, pm=pm)
        with torch.no_grad():
            outs.append(model(input_ids=calib.batches[0]["input_ids"]).logits)
    if not torch.equal(outs[0], outs[1]):
        raise _fail(method, "determinism", "two runs with seed 3 give different models")


def check_scores_reuse(method: str, *, pm: Any = None, plugins: Iterable[object] = (), family: str = "llama") -> None:
    """Scores do not depend on the budget (the score hook's contract): scores from a run at
    0.8, reused at 0.6, give exactly the model a fresh run at 0.6 gives."""
    from .pipeline import prune
    from .registry import Registry

    pm = _manager(pm, plugins)
    if not Registry(pm).method(method).recipe.prunes:
        return
    model, calib = contract_setup(family)
    first = prune(model, method, 0.8, calib=calib, seed=3, pm=pm)
    if first.scores is None:
        raise _fail(method, "score reuse", "a pruning method's result has no scores")
    outs = []
    for scores in (None, first.scores):
        model, _ = contract_setup(family)
        res = prune(model, method, 0.6, calib=calib, seed=3, scores=scores, pm=pm)
        if res.report["stages"].get("score_reused", False) is not (scores is not None):
            raise _fail(method, "score reuse", "the host did not record whether scores were reused")
        with torch.no_grad():
            outs.append(model(input_ids=calib.batches[0]["input_ids"]).logits)
    if not torch.equal(outs[0], outs[1]):
        raise _fail(method, "score reuse", "scores from a run at budget 0.8 give another model at 0.6 than a "
                    "fresh run: the score stage depends on ctx.budget (or writes state it later reads)")


def check_needs(method: str, *, pm: Any = None, plugins: Iterable[object] = ()) -> None:
    """A method that declares it needs calibration data is refused without it, before it runs."""
    from .pipeline import prune
    from .registry import Registry

    pm = _manager(pm, plugins)
    reg = Registry(pm)
    if not reg.needs(reg.method(method).recipe)["calibration"]:
        return
    try:
        prune(tiny_model("bert", head="sequence-classification"), method, 0.5, calib=None, pm=pm)
    except ValueError as err:
        if "needs calibration data" in str(err):
            return
        raise
    raise _fail(method, "declared needs", "it declares needs_calibration but ran without calibration data")


def check_method(name: str, *, pm: Any = None, plugins: Iterable[object] = (),
                 families: Iterable[str] = ("bert", "llama"), budget: float = 0.6) -> dict[str, dict[str, Any]]:
    """Run the contract every built-in method passes (``tests/test_contract.py``) on method
    ``name``: :func:`check_prune` on each of ``families`` (a tiny BERT classifier and a tiny
    GQA Llama by default), :func:`check_deterministic`, :func:`check_scores_reuse`,
    :func:`check_needs`. ``plugins``: plugin modules/objects to register besides the installed
    ones (for a plugin that is not installed); ``pm``: a ready plugin manager instead.
    Raises AssertionError naming the method and the broken clause (a stage failure surfaces
    as :class:`tshrink.errors.StageError` naming the plugin); returns the prune reports."""
    pm = _manager(pm, plugins)
    reports = {family: check_prune(name, family, pm=pm, budget=budget) for family in families}
    check_deterministic(name, pm=pm)
    check_scores_reuse(name, pm=pm)
    check_needs(name, pm=pm)
    return reports
