"""SQuAD v1.1 / v2.0 extractive question answering: loading, feature preparation,
n-best span decoding and an evaluation loop.

Feature preparation and span decoding follow the Hugging Face `run_qa` example:
question + context tokenized together with `truncation="only_second"`; contexts longer
than `max_length` overflow into several windows that overlap by `doc_stride` tokens (the
tokenizer's `stride`, i.e. the overlap, as in `run_qa`, not the step of the original BERT
script). Training features label the answer's first/last token, or the CLS index when the
question is unanswerable (v2) or the answer is not fully inside the window. Evaluation
features keep `example_id` and offsets only for context tokens (None elsewhere), so a
decoded span can only come from the context.

The question always comes first; batches are right-padded here (`pad_features`), so the
label positions never shift.

Examples are plain dicts in the Hugging Face `squad` layout plus the article they come from:
`{"id", "title", "article_index", "context", "question",
  "answers": {"text": [...], "answer_start": [...]}}` (empty lists: unanswerable, v2 only).

Offline only the v1.1 dev set exists (`<data dir>/squad/dev-v1.1.rebuilt.json`), so
fine-tuning and evaluation use a named split of its articles, see `split_articles`.
"""
from __future__ import annotations

import collections
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tshrink_harness.data import resolve_data_dir

VERSIONS = ("1.1", "2.0")
DEV_V11_FILE = "squad/dev-v1.1.rebuilt.json"  # relative to the data directory
DEFAULT_SPLIT = "dev-articles:train=0-23,eval=24-47"  # the 48 dev articles, halved in file order


# --------------------------------------------------------------------------- data


def default_squad_path(data_dir: str | os.PathLike | None = None) -> Path:
    """Where the local SQuAD v1.1 dev file is expected (may not exist) in the data directory
    (`data_dir`, else `$TSHRINK_DATA_DIR`; FileNotFoundError when neither is set)."""
    return resolve_data_dir(data_dir, required=True, what="the local SQuAD dev file") / DEV_V11_FILE


def _check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"SQuAD version {version!r} is not supported; use one of {VERSIONS}")
    return version


def load_squad(path: str | os.PathLike | None, version: str = "1.1") -> list[dict[str, Any]]:
    """Flat list of examples from an official SQuAD JSON file (`{"version", "data": [article,
    ...]}`), in file order. With `path=None` the validation split is downloaded with
    `datasets.load_dataset("rajpurkar/squad" | "rajpurkar/squad_v2")` (needs the Hugging
    Face hub, so it cannot run offline); articles are then numbered by first appearance of
    their title."""
    _check_version(version)
    if path is None:
        return _load_squad_hub(version)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or "data" not in raw:
        raise ValueError(f"{path} is not in the official SQuAD layout (a dict with a 'data' list)")
    file_version = str(raw.get("version", version)).lstrip("v")
    if file_version != version:
        raise ValueError(f"{path} says SQuAD version {file_version!r} but version={version!r} was asked")
    examples = []
    for article_index, article in enumerate(raw["data"]):
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [] if qa.get("is_impossible", False) else qa["answers"]
                if not answers and version == "1.1":
                    raise ValueError(f"question {qa['id']} has no answer, which SQuAD v1.1 does not allow")
                examples.append({
                    "id": qa["id"],
                    "title": article.get("title", ""),
                    "article_index": article_index,
                    "context": context,
                    "question": qa["question"],
                    "answers": {
                        "text": [a["text"] for a in answers],
                        "answer_start": [int(a["answer_start"]) for a in answers],
                    },
                })
    return examples


def _load_squad_hub(version: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    name = "rajpurkar/squad" if version == "1.1" else "rajpurkar/squad_v2"
    rows = load_dataset(name, split="validation")
    article_of_title: dict[str, int] = {}
    examples = []
    for row in rows:
        index = article_of_title.setdefault(row["title"], len(article_of_title))
        examples.append({
            "id": row["id"], "title": row["title"], "article_index": index,
            "context": row["context"], "question": row["question"],
            "answers": {"text": list(row["answers"]["text"]),
                        "answer_start": [int(s) for s in row["answers"]["answer_start"]]},
        })
    return examples


def article_split_name(n_articles: int, n_train: int) -> str:
    """Canonical name of the split that fine-tunes on the first `n_train` articles and
    evaluates on the rest, e.g. `article_split_name(48, 24)` ->
    "dev-articles:train=0-23,eval=24-47"."""
    if not 0 < n_train < n_articles:
        raise ValueError(f"n_train={n_train} must be between 1 and n_articles-1={n_articles - 1}")
    return f"dev-articles:train=0-{n_train - 1},eval={n_train}-{n_articles - 1}"


_SPLIT_RE = re.compile(r"^dev-articles:train=(\d+)-(\d+),eval=(\d+)-(\d+)$")


def split_articles(examples: Sequence[dict[str, Any]], name: str = DEFAULT_SPLIT,
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train examples, eval examples) by article index, as the split `name` says.

    Name format: "dev-articles:train=A-B,eval=C-D", inclusive ranges of 0-based article
    indices in file order (see `article_split_name`). The two ranges must not overlap and
    must lie inside the articles present; the split is deterministic (no shuffling), so the
    name alone reproduces it."""
    match = _SPLIT_RE.match(name)
    if match is None:
        raise ValueError(f"split name {name!r} is not of the form "
                         "'dev-articles:train=A-B,eval=C-D' (inclusive 0-based article ranges)")
    a, b, c, d = map(int, match.groups())
    if a > b or c > d:
        raise ValueError(f"split name {name!r} has a range whose start is after its end")
    if not (b < c or d < a):
        raise ValueError(f"split name {name!r}: train range {a}-{b} overlaps eval range {c}-{d}")
    n_articles = 1 + max((ex["article_index"] for ex in examples), default=-1)
    if max(b, d) >= n_articles:
        raise ValueError(f"split name {name!r} refers to article {max(b, d)}, "
                         f"but the examples only have articles 0-{n_articles - 1}")
    train = [ex for ex in examples if a <= ex["article_index"] <= b]
    evaluation = [ex for ex in examples if c <= ex["article_index"] <= d]
    return train, evaluation


def squad_references(examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """References in the Hugging Face `squad` metric layout: `[{"id", "answers": {"text",
    "answer_start"}}]` (empty answer lists mean "no answer", SQuAD v2)."""
    return [{"id": ex["id"], "answers": {"text": list(ex["answers"]["text"]),
                                         "answer_start": list(ex["answers"]["answer_start"])}}
            for ex in examples]


# ----------------------------------------------------------------------- features


def _tokenize_windows(examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int,
                      doc_stride: int) -> Any:
    if doc_stride >= max_length:
        raise ValueError(f"doc_stride={doc_stride} must be smaller than max_length={max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; "
                         "offset mappings need a `tokenizers`-backed (fast) tokenizer")
    questions = [ex["question"].lstrip() for ex in examples]  # some questions start with spaces
    contexts = [ex["context"] for ex in examples]
    return tokenizer(questions, contexts, truncation="only_second", max_length=max_length,
                     stride=doc_stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True, padding=False)


def _cls_index(input_ids: list[int], tokenizer: Any) -> int:
    cls_id = tokenizer.cls_token_id
    return input_ids.index(cls_id) if cls_id is not None and cls_id in input_ids else 0


def prepare_train_features(examples: Sequence[dict[str, Any]], tokenizer: Any, *,
                           max_length: int = 384, doc_stride: int = 128) -> dict[str, list]:
    """Windows with `start_positions`/`end_positions` (token indices of the first answer's
    first and last token; the CLS index when unanswerable or when the answer is not wholly
    inside the window). Columns: the tokenizer's inputs, `start_positions`, `end_positions`,
    `example_index`. Not padded (see `pad_features`)."""
    enc = _tokenize_windows(examples, tokenizer, max_length, doc_stride)
    sample_map = enc["overflow_to_sample_mapping"]
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        cls = _cls_index(enc["input_ids"][i], tokenizer)
        seq_ids = enc.sequence_ids(i)
        answers = examples[sample_map[i]]["answers"]
        if not answers["answer_start"]:  # unanswerable (v2): point at CLS
            starts.append(cls)
            ends.append(cls)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        ctx_tokens = [k for k, s in enumerate(seq_ids) if s == 1]
        first, last = ctx_tokens[0], ctx_tokens[-1]
        if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
            starts.append(cls)  # answer not wholly inside this window
            ends.append(cls)
            continue
        while first <= last and offsets[first][0] <= start_char:  # last token starting at/before
            first += 1
        while offsets[last][1] >= end_char:  # first token ending at/after the answer's end
            last -= 1
        starts.append(first - 1)
        ends.append(last + 1)
    features = {k: list(enc[k]) for k in tokenizer.model_input_names if k in enc}
    features.update(start_positions=starts, end_positions=ends, example_index=list(sample_map))
    return features


def prepare_eval_features(examples: Sequence[dict[str, Any]], tokenizer: Any, *,
                          max_length: int = 384, doc_stride: int = 128) -> dict[str, list]:
    """Windows for inference. Columns: the tokenizer's inputs, `example_id` (the SQuAD id of
    the window's example) and `offset_mapping` with character offsets for context tokens and
    None for question/special tokens. Not padded (see `pad_features`)."""
    enc = _tokenize_windows(examples, tokenizer, max_length, doc_stride)
    sample_map = enc["overflow_to_sample_mapping"]
    example_ids, offset_mapping = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        seq_ids = enc.sequence_ids(i)
        example_ids.append(examples[sample_map[i]]["id"])
        offset_mapping.append([tuple(o) if seq_ids[k] == 1 else None for k, o in enumerate(offsets)])
    features = {k: list(enc[k]) for k in tokenizer.model_input_names if k in enc}
    features.update(example_id=example_ids, offset_mapping=offset_mapping)
    return features


def pad_features(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token columns of several features to the longest one: `input_ids` with
    `pad_token_id`, everything else (attention_mask, token_type_ids) with 0. Integer columns
    (start/end positions) are stacked. Returns tensors of shape (batch, seq) / (batch,)."""
    longest = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, torch.Tensor] = {}
    for key, value in rows[0].items():
        if isinstance(value, list):
            fill = pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([r[key] + [fill] * (longest - len(r[key])) for r in rows])
        else:
            batch[key] = torch.tensor([r[key] for r in rows])
    return batch


# ----------------------------------------------------------------- span decoding


@dataclass
class SpanDecodeConfig:
    """How logits become answer text (defaults of the Hugging Face `run_qa` example)."""

    n_best: int = 20  # top start and top end logits tried per window, and answers kept
    max_answer_length: int = 30  # longest answer in tokens (end - start + 1)
    version_2_with_negative: bool = False  # SQuAD v2: may answer "" (no answer)
    null_score_diff_threshold: float = 0.0  # v2: answer "" when null - best span > this


@dataclass
class SquadPrediction:
    """Decoded answer of one example with the scores behind it."""

    text: str
    score: float  # start + end logit of the chosen span (the null score when text is "")
    null_score_diff: float | None = None  # v2: null score - best span score
    n_best: list[dict[str, Any]] = field(default_factory=list)  # {"text", "score", "offsets"}


def postprocess_predictions(examples: Sequence[dict[str, Any]], features: dict[str, list],
                            start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray],
                            config: SpanDecodeConfig | None = None) -> dict[str, SquadPrediction]:
    """Map per-window start/end logits back to answer text for every example.

    For each window, the `n_best` largest start and end logits are paired; a pair is a
    candidate when both tokens are context tokens (offset not None), end >= start and the
    span is at most `max_answer_length` tokens. The answer is the candidate with the highest
    start + end logit over all windows of the example ("" when there is none). With
    `version_2_with_negative`, the null score is the smallest CLS (index 0) start + end
    logit over the windows, and the answer is "" when null - best > threshold.
    `start_logits[i]`/`end_logits[i]` are 1-D arrays for feature i (longer than the
    feature, e.g. padded, is fine)."""
    cfg = config or SpanDecodeConfig()
    if len(start_logits) != len(features["example_id"]) or len(end_logits) != len(start_logits):
        raise ValueError(f"got {len(start_logits)} start / {len(end_logits)} end logit rows "
                         f"for {len(features['example_id'])} features")
    features_of: dict[str, list[int]] = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        features_of[example_id].append(i)

    predictions: dict[str, SquadPrediction] = {}
    for ex in examples:
        context = ex["context"]
        candidates: list[dict[str, Any]] = []
        null_score: float | None = None
        for i in features_of.get(ex["id"], []):
            start, end = np.asarray(start_logits[i]), np.asarray(end_logits[i])  # (seq,)
            offsets = features["offset_mapping"][i]
            window_null = float(start[0] + end[0])
            null_score = window_null if null_score is None else min(null_score, window_null)
            top_starts = np.argsort(start)[::-1][: cfg.n_best]
            top_ends = np.argsort(end)[::-1][: cfg.n_best]
            for s in top_starts:
                for e in top_ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > cfg.max_answer_length:
                        continue
                    span = (offsets[s][0], offsets[e][1])
                    candidates.append({"text": context[span[0]:span[1]],
                                       "score": float(start[s] + end[e]), "offsets": span})
        candidates = sorted(candidates, key=lambda c: c["score"], reverse=True)[: cfg.n_best]
        best = candidates[0] if candidates else None
        if not cfg.version_2_with_negative:
            predictions[ex["id"]] = SquadPrediction(
                text=best["text"] if best else "", score=best["score"] if best else float("-inf"),
                n_best=candidates)
            continue
        null = float("inf") if null_score is None else null_score  # no window: answer ""
        diff = null - (best["score"] if best else float("-inf"))
        if diff > cfg.null_score_diff_threshold:
            predictions[ex["id"]] = SquadPrediction("", null, diff, candidates)
        else:
            predictions[ex["id"]] = SquadPrediction(best["text"], best["score"], diff, candidates)
    return predictions


# --------------------------------------------------------------------- evaluation


@dataclass
class SquadEvalOutput:
    """What `evaluate_squad` returns; `predictions` + `references` feed the EM/F1 metric."""

    predictions: dict[str, str]  # example id -> answer text ("" = no answer)
    references: list[dict[str, Any]]  # see `squad_references`
    null_score_diffs: dict[str, float] | None  # v2 only: id -> null - best span score
    n_examples: int
    n_features: int  # windows after doc_stride overflow


def predict_logits(model: torch.nn.Module, features: dict[str, list], tokenizer: Any, *,
                   batch_size: int = 32, device: str | torch.device = "cpu",
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start/end logits (float32 numpy, one 1-D array per feature, trimmed to the feature's
    length) of a `...ForQuestionAnswering` model over prepared features."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    inputs = [k for k in tokenizer.model_input_names if k in features]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(features["input_ids"])
    was_training = model.training
    model.eval()
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for lo in range(0, n, batch_size):
                rows = [{k: features[k][i] for k in inputs} for i in range(lo, min(lo + batch_size, n))]
                batch = {k: v.to(device) for k, v in pad_features(rows, pad_id).items()}
                out = model(**batch)
                s = out.start_logits.float().cpu().numpy()  # (batch, seq)
                e = out.end_logits.float().cpu().numpy()  # (batch, seq)
                for j, row in enumerate(rows):
                    length = len(row["input_ids"])
                    starts.append(s[j, :length])
                    ends.append(e[j, :length])
    finally:
        model.train(was_training)
    return starts, ends


def evaluate_squad(model: torch.nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]], *,
                   batch_size: int = 32, device: str | torch.device = "cpu",
                   max_length: int = 384, doc_stride: int = 128,
                   decode: SpanDecodeConfig | None = None) -> SquadEvalOutput:
    """Run a QA model over `examples` and decode answers (see `postprocess_predictions`).

    The model must already sit on `device`. Set `decode.version_2_with_negative` for SQuAD
    v2; examples without answers with it unset raise ValueError (v1.1 decoding can never
    answer "" and would silently score them 0)."""
    cfg = decode or SpanDecodeConfig()
    if not examples:
        raise ValueError("examples is empty; nothing to evaluate")
    unanswerable = sum(not ex["answers"]["text"] for ex in examples)
    if unanswerable and not cfg.version_2_with_negative:
        raise ValueError(f"{unanswerable} examples have no answer (SQuAD v2) but "
                         "decode.version_2_with_negative is False; pass "
                         "SpanDecodeConfig(version_2_with_negative=True)")
    features = prepare_eval_features(examples, tokenizer, max_length=max_length, doc_stride=doc_stride)
    starts, ends = predict_logits(model, features, tokenizer, batch_size=batch_size, device=device)
    decoded = postprocess_predictions(examples, features, starts, ends, cfg)
    return SquadEvalOutput(
        predictions={k: p.text for k, p in decoded.items()},
        references=squad_references(examples),
        null_score_diffs=({k: p.null_score_diff for k, p in decoded.items()}
                          if cfg.version_2_with_negative else None),
        n_examples=len(examples),
        n_features=len(features["input_ids"]),
    )
