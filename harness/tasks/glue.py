"""GLUE tasks: a registry, readers for the GLUE TSV files, and tokenisation.

    from tshrink_harness.tasks.glue import load_glue, encode_glue
    examples = load_glue("SST-2", "validation", data_dir="../shared/data")
    batch = encode_glue(examples, tokenizer, max_length=128)

Every loader returns a list of dicts with the same keys for every task:

    text_a  str          first (or only) sentence
    text_b  str | None   second sentence of a pair; None for CoLA and SST-2
    label   int | float | None
                         class index with the Hugging Face `glue` label order (see
                         GLUE_TASKS[...].labels), a float similarity score for STS-B, None
                         where the split has no labels (GLUE test files; -1 in HF data)
    idx     int          0-based row number in the file (the HF `idx`)

Files on disk (`data_dir`) may be in either layout, looked up in this order:
  * the official GLUE distribution: <data_dir>/<Folder>/<split>.tsv, e.g. SST-2/dev.tsv,
    MNLI/dev_matched.tsv; CoLA train/dev have no header; MRPC files start with a UTF-8 BOM;
  * a Hugging Face export: <data_dir>/<Folder>/<split>.hf.tsv with the header
    "<HF text columns>\\tlabel\\tidx" (e.g. sentence1\\tsentence2\\tlabel\\tidx) and integer
    labels (-1 = unlabelled).
<data_dir> may also be a folder that holds glue/<Folder>/ (e.g. the shared data root).
Rows with missing fields are skipped with a warning, as the HF `glue` builder skips them.
"""
from __future__ import annotations

import csv
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, Sequence

HF_DATASET = "nyu-mll/glue"  # the hub id of the `glue` dataset (formerly just "glue")


@dataclass(frozen=True)
class GlueTask:
    """What is needed to read, encode and score one GLUE task."""

    name: str  # HF config name, also the glue metric config: "sst2", "mnli_mismatched", ...
    folder: str  # directory in the official GLUE layout: "SST-2", "MNLI", ...
    hf_fields: tuple[str, ...]  # HF dataset columns of text_a (and text_b)
    tsv_fields: tuple[str, ...]  # the same columns in the official TSV files
    label_column: str  # label column in the official TSV train/dev files
    labels: tuple[str, ...] | None  # class names in HF order (index = label); None: regression
    metrics: tuple[str, ...]  # keys the glue metric returns for this task
    main_metric: str  # the one number to compare methods by
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "validation": "dev", "test": "test"})

    @property
    def is_regression(self) -> bool:
        """True for STS-B (float scores), False for classification tasks."""
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Number of classes; 1 for the regression task (one output)."""
        return 1 if self.labels is None else len(self.labels)

    def files(self) -> dict[str, str]:
        """split -> path of its official file relative to the GLUE root, e.g. "MNLI/dev_matched.tsv"."""
        return {split: f"{self.folder}/{stem}.tsv" for split, stem in self.splits.items()}


_NLI3 = ("entailment", "neutral", "contradiction")
_MNLI = dict(folder="MNLI", hf_fields=("premise", "hypothesis"), tsv_fields=("sentence1", "sentence2"),
             label_column="gold_label", labels=_NLI3, metrics=("accuracy",), main_metric="accuracy")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "CoLA", ("sentence",), ("sentence",), "label", ("unacceptable", "acceptable"),
                 ("matthews_correlation",), "matthews_correlation"),
        GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive"),
                 ("accuracy",), "accuracy"),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                 ("not_equivalent", "equivalent"), ("accuracy", "f1"), "accuracy"),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                 ("not_duplicate", "duplicate"), ("accuracy", "f1"), "accuracy"),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
                 ("pearson", "spearmanr"), "spearmanr"),
        GlueTask("mnli", splits={"train": "train", "validation_matched": "dev_matched",
                                 "validation_mismatched": "dev_mismatched", "test_matched": "test_matched",
                                 "test_mismatched": "test_mismatched"}, **_MNLI),
        GlueTask("mnli_matched", splits={"validation": "dev_matched", "test": "test_matched"}, **_MNLI),
        GlueTask("mnli_mismatched", splits={"validation": "dev_mismatched", "test": "test_mismatched"}, **_MNLI),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                 ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 ("not_entailment", "entailment"), ("accuracy",), "accuracy"),
    )
}

_TASK_ALIASES = {"mnlim": "mnli_matched", "mnlimm": "mnli_mismatched"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def glue_task(name: str) -> GlueTask:
    """The spec of a GLUE task; case, '-' and '_' are ignored ("SST-2", "sts-b", "mnli-mm").

    Raises ValueError with a "did you mean" suggestion and the list of tasks.
    """
    table = {_key(n): n for n in GLUE_TASKS}
    table.update(_TASK_ALIASES)
    if _key(name) in table:
        return GLUE_TASKS[table[_key(name)]]
    close = get_close_matches(str(name).lower().replace("-", ""), list(GLUE_TASKS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown GLUE task {name!r}.{hint} Known tasks: {', '.join(GLUE_TASKS)} "
        "(also written like 'SST-2', 'STS-B', 'mnli-m', 'mnli-mm')."
    )


def _split_name(spec: GlueTask, split: str) -> str:
    """Canonical split name of the task ("dev" -> "validation", "dev_matched" -> "validation_matched")."""
    key = str(split).strip().lower().replace("-", "_")
    key = re.sub(r"^(dev|val|valid)(?=$|_)", "validation", key)
    if key in spec.splits:
        return key
    raise ValueError(
        f"Unknown split {split!r} for GLUE task {spec.name!r}; accepted: {', '.join(spec.splits)}"
        " ('dev' may stand for 'validation')."
    )


def _find_file(spec: GlueTask, stem: str, data_dir: str) -> str:
    tried = []
    for root in (data_dir, os.path.join(data_dir, "glue")):
        for name in (f"{stem}.tsv", f"{stem}.hf.tsv"):
            path = os.path.join(root, spec.folder, name)
            if os.path.isfile(path):
                return path
            tried.append(path)
    header = "\\t".join(spec.hf_fields + ("label", "idx"))
    raise FileNotFoundError(
        f"No GLUE file for task {spec.name!r} split file {stem!r}; looked for: {', '.join(tried)}. "
        f"Expected layout: <data_dir>/{spec.folder}/{stem}.tsv (official GLUE TSV) or "
        f"<data_dir>/{spec.folder}/{stem}.hf.tsv (Hugging Face export, header {header}); "
        "<data_dir> may also hold these under glue/."
    )


def _class_label(spec: GlueTask, value: str, where: str) -> int | float:
    """Label of the official TSV: class name or integer index; float score for STS-B."""
    try:
        if spec.labels is None:
            return float(value)
        if value in spec.labels:
            return spec.labels.index(value)
        index = int(value)
    except ValueError:
        index = None
    if index is None or not 0 <= index < len(spec.labels or ()):
        accepted = "a number" if spec.labels is None else f"{list(spec.labels)} or 0..{len(spec.labels) - 1}"
        raise ValueError(f"Bad label {value!r} at {where}; task {spec.name!r} accepts {accepted}.")
    return index


def _hf_label(spec: GlueTask, value: Any, where: str) -> int | float | None:
    """Label of a HF row / export: integer index (float for STS-B); -1 means unlabelled."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (spec.labels is not None and number != int(number)):
        raise ValueError(f"Bad label {value!r} at {where}; the Hugging Face layout has numeric labels.")
    if number == -1:
        return None
    if spec.labels is None:
        return number
    if not 0 <= number < len(spec.labels):
        raise ValueError(f"Bad label {value!r} at {where}; task {spec.name!r} accepts 0..{len(spec.labels) - 1} or -1.")
    return int(number)


def _read_rows(path: str, spec: GlueTask) -> list[dict[str, Any]]:
    hf_layout = path.endswith(".hf.tsv")
    fields = spec.hf_fields if hf_layout else spec.tsv_fields
    label_col = "label" if hf_layout else spec.label_column
    out, skipped = [], 0
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops MRPC's BOM
        headerless = spec.name == "cola" and not hf_layout and not os.path.basename(path).startswith("test")
        if headerless:  # CoLA train/dev: source, label, original notation, sentence
            rows = ({"sentence": r[3], "label": r[1]} if len(r) >= 4 else {} for r in csv.reader(
                f, delimiter="\t", quoting=csv.QUOTE_NONE))
            has_label = True
        else:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = reader.fieldnames or []
            missing = [c for c in fields if c not in header]
            if missing:
                raise ValueError(
                    f"{path}: header {header} lacks the column(s) {missing}; expected the "
                    f"{'Hugging Face export' if hf_layout else 'official GLUE'} layout for {spec.name!r} "
                    f"(text columns {list(fields)}, label column {label_col!r})."
                )
            has_label = label_col in header
            rows = reader
        for n, row in enumerate(rows):
            texts = [row.get(c) for c in fields]
            raw_label = row.get(label_col) if has_label else None
            if any(t is None for t in texts) or (has_label and not raw_label):
                skipped += 1  # a corrupted row: the HF builder drops these too
                continue
            where = f"{path} data row {n}"
            if not has_label:
                label = None
            elif hf_layout:
                label = _hf_label(spec, raw_label, where)
            else:
                label = _class_label(spec, raw_label, where)
            out.append({"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": label, "idx": n})
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} row(s) with missing fields", stacklevel=3)
    return out


def read_glue_file(path: str, task: str) -> list[dict[str, Any]]:
    """Read one GLUE TSV file of `task` (official layout, or HF export when named *.hf.tsv)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GLUE file {path} does not exist.")
    return _read_rows(path, glue_task(task))


def _from_hf_dataset(rows, spec: GlueTask) -> list[dict[str, Any]]:
    a, b = (spec.hf_fields + (None,))[:2]
    return [
        {"text_a": r[a], "text_b": r[b] if b else None,
         "label": _hf_label(spec, r["label"], f"{HF_DATASET}/{spec.name} row {r['idx']}"), "idx": int(r["idx"])}
        for r in rows
    ]


def load_glue(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Examples of one GLUE task and split as dicts {text_a, text_b, label, idx} (module docstring).

    task: "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched",
        "qnli", "rte", "wnli" (any case, "-" / "_" ignored).
    split: "train", "validation" (or "dev"), "test"; for "mnli": "validation_matched",
        "validation_mismatched", "test_matched", "test_mismatched".
    data_dir: folder with the GLUE files (see the module docstring). None downloads the
        Hugging Face dataset with `datasets.load_dataset` instead, which needs the hub; that
        path is not exercised by the offline tests.
    """
    spec = glue_task(task)
    split = _split_name(spec, split)
    if data_dir is None:
        import datasets  # heavy and online: only on this path

        return _from_hf_dataset(datasets.load_dataset(HF_DATASET, spec.name, split=split), spec)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"GLUE data_dir {data_dir} is not a directory.")
    return _read_rows(_find_file(spec, spec.splits[split], data_dir), spec)


def encode_glue(
    examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int = 128, padding: str = "longest"
) -> dict[str, Any]:
    """Tokenise examples from `load_glue` into a dict of torch tensors.

    Keys: input_ids, attention_mask, token_type_ids (when the tokenizer gives them) and
    labels (float32 for STS-B scores, int64 class indices otherwise; left out when every
    label is None). Pairs are truncated "longest first" to max_length; padding "longest"
    pads to the longest encoded example, "max_length" to max_length.
    """
    import torch

    if not examples:
        raise ValueError("examples is empty; give at least one example.")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}.")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}.")
    if getattr(tokenizer, "pad_token", "") is None:
        raise ValueError("the tokenizer has no pad token; set one first (e.g. tokenizer.pad_token = tokenizer.eos_token).")
    pairs = [e.get("text_b") is not None for e in examples]
    if any(pairs) and not all(pairs):
        raise ValueError(f"examples mix sentence pairs and single sentences (example {pairs.index(not pairs[0])} differs from example 0).")
    text_a = [e["text_a"] for e in examples]
    text_b = [e["text_b"] for e in examples] if pairs[0] else None
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
    out = {k: v for k, v in enc.items()}
    labels = [e.get("label") for e in examples]
    missing = [i for i, v in enumerate(labels) if v is None]
    if len(missing) == len(labels):
        return out
    if missing:
        raise ValueError(f"example {missing[0]} has no label while others have; encode labelled and unlabelled data apart.")
    regression = any(isinstance(v, float) for v in labels)
    out["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return out
