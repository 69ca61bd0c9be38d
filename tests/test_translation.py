"""Translation BLEU on a tiny random Marian with an offline tokenizer, and quantizing it."""
from __future__ import annotations

import pytest
import sacrebleu
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

from tshrink.checkpoint import load_pruned, save_pruned
from tshrink.pipeline import prune
from tshrink_harness.tasks.translation import evaluate_bleu, read_lines, read_parallel, translate, translation_batches
from tshrink_plugins.quant.scope import scope_linears

PAIRS = [
    ("the cat sits on the mat .", "die katze sitzt auf der matte ."),
    ("a dog runs in the park .", "ein hund rennt im park ."),
    ("we read a good book today .", "wir lesen heute ein gutes buch ."),
    ("the weather is cold .", "das wetter ist kalt ."),
    ("she drinks green tea every morning .", "sie trinkt jeden morgen grünen tee ."),
]
SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 (Marian: decoder start = pad)


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over `texts` (shared source/target vocabulary), with
    `</s>` appended to every sequence like Marian's."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_marian(vocab_size: int, seed: int = 0) -> MarianMTModel:
    torch.manual_seed(seed)
    cfg = MarianConfig(vocab_size=vocab_size, d_model=16, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                       max_position_embeddings=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                       forced_eos_token_id=1, init_std=0.5)  # large weights: varied greedy outputs
    return MarianMTModel(cfg).eval()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer([t for pair in PAIRS for t in pair])


class Echo(torch.nn.Module):
    """Stands in for a model that "translates" by copying its (unpadded) input."""

    def generate(self, input_ids, attention_mask, **kwargs):
        return input_ids * attention_mask  # padding -> <pad> (id 0), dropped when decoding


def test_bleu_pipeline_aligns_hypotheses_with_references(tok):
    same = [(s, s) for s, _ in PAIRS]
    out = evaluate_bleu(Echo(), tok, same, batch_size=2, max_new_tokens=4, num_beams=1, return_hypotheses=True)
    assert out["hypotheses"] == [s for s, _ in PAIRS] and out["n"] == 5
    assert out["bleu"] == pytest.approx(100.0)
    shuffled = [(s, same[(i + 1) % 5][1]) for i, (s, _) in enumerate(same)]  # every reference misaligned
    assert evaluate_bleu(Echo(), tok, shuffled, batch_size=2, num_beams=1)["bleu"] < 20
    edited = [(s, s.replace("the", "a")) for s, _ in PAIRS]  # partly matching references
    got = evaluate_bleu(Echo(), tok, edited, batch_size=3, num_beams=1)["bleu"]
    assert 10 < got < 90 and got == sacrebleu.corpus_bleu([s for s, _ in PAIRS], [[r for _, r in edited]]).score


def test_bleu_on_tiny_marian_equals_sacrebleu_on_its_hypotheses(tok):
    model = tiny_marian(len(tok))
    out = evaluate_bleu(model, tok, PAIRS, batch_size=2, max_new_tokens=6, num_beams=2, return_hypotheses=True)
    refs = [r for _, r in PAIRS]
    assert out["bleu"] == sacrebleu.corpus_bleu(out["hypotheses"], [refs]).score
    assert out["n"] == len(PAIRS) and out["signature"].startswith("nrefs:1")
    # batching (and the length sort) does not change what each sentence gets
    one_by_one = translate(model, tok, [s for s, _ in PAIRS], batch_size=1, max_new_tokens=6, num_beams=2)
    assert one_by_one == out["hypotheses"]
    with pytest.raises(ValueError, match="no sentence pairs"):
        evaluate_bleu(model, tok, [])


def test_read_parallel_text_and_sgm(tmp_path):
    (tmp_path / "src.txt").write_text("hello world\nsecond line  \n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("hallo welt\nzweite zeile\n", encoding="utf-8")
    assert read_parallel(tmp_path / "src.txt", tmp_path / "ref.txt") == [("hello world", "hallo welt"),
                                                                         ("second line", "zweite zeile")]
    assert read_parallel(tmp_path / "src.txt", tmp_path / "ref.txt", limit=1) == [("hello world", "hallo welt")]
    (tmp_path / "ref.sgm").write_text('<refset setid="x">\n<doc docid="1">\n<p>\n<seg id="1"> hallo welt </seg>\n'
                                      '<seg id="2">zweite &amp; zeile</seg>\n</p>\n</doc>\n</refset>\n', encoding="utf-8")
    assert read_lines(tmp_path / "ref.sgm") == ["hallo welt", "zweite &amp; zeile"]
    (tmp_path / "short.txt").write_text("one\n", encoding="utf-8")
    with pytest.raises(ValueError, match="aligned"):
        read_parallel(tmp_path / "src.txt", tmp_path / "short.txt")


def test_kmeans_on_marian_self_attention_through_prune_and_save_load(tok, tmp_path):
    model = tiny_marian(len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune(model, "kmeans", 1.0, options={"quant_scope": "attention", "quant_bits": 2})
    quantized = {n for n, _ in scope_linears(model, "attention")}
    assert len(quantized) == 4 * 4  # q, k, v, out of 2 encoder + 2 decoder self-attentions
    assert not any("encoder_attn" in n or "fc" in n for n in quantized)
    for name, value in model.state_dict().items():
        if name in quantized:
            assert all(row.unique().numel() <= 4 for row in value)
        else:
            assert torch.equal(value, before[name]), name  # cross-attention, MLP, embeddings untouched
    assert res.report["transforms"]["kmeans"]["quantized_params"] == 16 * 16 * 16
    save_pruned(model, tmp_path / "m", tokenizer=tok, compressed=res.compressed)
    again = load_pruned(tmp_path / "m")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    kw = dict(batch_size=2, max_new_tokens=6, num_beams=2, return_hypotheses=True)
    assert evaluate_bleu(again, tok, PAIRS, **kw) == evaluate_bleu(model, tok, PAIRS, **kw)


def test_bs_flex_recovery_on_marian_with_labelled_pairs(tok):
    calib = translation_batches(tok, PAIRS, batch_size=3)
    assert calib.has_labels and (calib.batches[0]["labels"] == -100).any()  # padded targets ignored
    model = tiny_marian(len(tok))
    res = prune(model, "bs-flex", 1.0, calib=calib,
                options={"quant_scope": "all", "quant_flex_steps": 10, "quant_lr": 1e-2})
    rec = res.report["transforms"]["bs-flex"]["recovery"]
    assert rec["loss"] == "labels" and rec["loss_after"] < rec["loss_before"]
    assert len(evaluate_bleu(model, tok, PAIRS, num_beams=1, max_new_tokens=4, return_hypotheses=True)["hypotheses"]) == 5
