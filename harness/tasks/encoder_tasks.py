"""Encoder tasks: every GLUE task (sequence classification; STS-B regression) and SQuAD
v1.1 / v2.0 (extractive QA on a named split of the dev articles).

Calibration draws labelled examples from the task's training data (GLUE ``train``; for
SQuAD the fine-tuning part of the dev-article split), so Fisher-style methods get their
task loss; evaluation runs on the dev split with the packaged metrics (harness/metrics).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import EvalResult, Task, data_hash, register

# The computation of the packaged `evaluate` metric, called directly: the same numbers
# without importing `evaluate` (about 10 s on a small CPU).
METRIC_NOTE = "tshrink_harness.metrics {} (scores module of the packaged evaluate metric)"


def _hub_error(task: str, err: Exception, layout: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"task {task!r}: no data directory (--data-dir / $TSHRINK_DATA_DIR) and the Hugging Face hub failed "
        f"({type(err).__name__}: {str(err)[:200]}). Expected layout: {layout}")


def _check_head(config: Any, spec: str, task: str, suffix: str, num_labels: int | None) -> None:
    archs = getattr(config, "architectures", None) or []
    hint = (f"fine-tune it first: `harness finetune --task {task} --model {spec} --output DIR`, "
            f"then pass --model DIR")
    if not any(a.endswith(suffix) for a in archs):
        raise ValueError(f"task {task!r} needs a model with a fine-tuned {suffix} head; model {spec!r} is "
                         f"{archs or 'a bare backbone'}: {hint}")
    done = getattr(config, "finetuning_task", None)
    if done and _norm(done) != _norm(task):
        raise ValueError(f"model {spec!r} was fine-tuned for {done!r}, not {task!r}: {hint}")
    if num_labels is not None and getattr(config, "num_labels", num_labels) != num_labels:
        raise ValueError(f"model {spec!r} has {config.num_labels} outputs, task {task!r} needs {num_labels}: {hint}")


def _norm(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


@dataclass
class GlueTask(Task):
    """One GLUE task; dev = the ``validation`` split (``validation_matched`` for MNLI)."""

    train_task: str = ""  # task whose train split calibrates / fine-tunes (mnli for mnli_mismatched)
    eval_split: str = "validation"

    def check_model(self, config: Any, spec: str) -> None:
        super().check_model(config, spec)
        _check_head(config, spec, self.name, "ForSequenceClassification", self.num_labels)

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        from .glue import load_glue

        try:
            self._eval = load_glue(self.name, self.eval_split, data_dir)
            self._train = load_glue(self.train_task, "train", data_dir) if need_train else []
        except FileNotFoundError as err:
            raise FileNotFoundError(f"task {self.name!r}: {err}") from None
        except Exception as err:  # noqa: BLE001 - only the hub path gets here (offline, ...)
            if data_dir is not None:
                raise
            raise _hub_error(self.name, err, self.data_layout) from None
        if any(e["label"] is None for e in self._eval):
            raise ValueError(f"task {self.name!r}: the {self.eval_split} split has unlabelled rows")
        self.info = {"task": self.name, "split": f"{self.eval_split} (GLUE dev)", "eval_examples": len(self._eval),
                     "train_examples": len(self._train), "source": str(data_dir) if data_dir else "hub:nyu-mll/glue",
                     "data_hash": data_hash([self._eval, self._train])}

    def _sample_train(self, n: int | None, seed: int) -> list[dict[str, Any]]:
        if not self._train:
            raise ValueError(f"task {self.name!r}: no training examples were loaded")
        if n is None or n >= len(self._train):
            return list(self._train)
        return random.Random(seed).sample(self._train, n)

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        from tshrink.calibration import CalibrationData

        from .glue import encode_glue

        # as Kwon et al.'s public code: `samples` training examples drawn WITH replacement, dynamic padding
        if not self._train:
            raise ValueError(f"task {self.name!r}: no training examples were loaded")
        chosen = random.Random(seed).choices(self._train, k=samples)
        batches = [encode_glue(chosen[i:i + batch_size], tokenizer, max_length=seq_len)
                   for i in range(0, len(chosen), batch_size)]
        return CalibrationData(batches, source=f"glue/{self.train_task}:train ({len(chosen)} drawn with replacement, "
                               f"seed {seed})", meta={"kind": "glue", "labelled": True, "sampling": "with replacement"})

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        import torch
        from tqdm.auto import tqdm

        from ..metrics.glue_metric.glue_scores import glue_scores
        from .glue import encode_glue

        examples = self._eval[:limit]
        preds: list[Any] = []
        model.eval()
        with torch.inference_mode():
            for i in tqdm(range(0, len(examples), batch_size), desc=f"eval {self.name}", unit="batch", leave=False,
                          disable=len(examples) <= 4 * batch_size):
                enc = encode_glue(examples[i:i + batch_size], tokenizer, max_length=seq_len)
                enc.pop("labels", None)
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float()  # (batch, labels)
                preds += (logits[:, 0] if self.num_labels == 1 else logits.argmax(-1)).tolist()
        refs = [e["label"] for e in examples]
        scores = glue_scores(self.name, preds, refs)
        return EvalResult({k: float(v) for k, v in scores.items()},
                          {"split": self.info["split"], "examples": len(examples), "max_length": seq_len,
                           "metric": METRIC_NOTE.format("glue")})

    # -- fine-tuning ----------------------------------------------------------------------
    def configure_model(self, config: Any) -> None:
        from .glue import GLUE_TASKS

        spec = GLUE_TASKS[self.name]
        config.finetuning_task = self.name
        if spec.labels is None:
            config.problem_type = "regression"
        else:
            config.id2label = dict(enumerate(spec.labels))
            config.label2id = {v: k for k, v in config.id2label.items()}
            config.problem_type = "single_label_classification"

    def finetune_rows(self, tokenizer: Any, *, max_length: int, limit: int | None, seed: int) -> list[dict[str, Any]]:
        chosen = self._sample_train(limit, seed)
        pair = chosen[0]["text_b"] is not None
        enc = tokenizer([e["text_a"] for e in chosen], [e["text_b"] for e in chosen] if pair else None,
                        truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [dict({k: enc[k][i] for k in keys}, labels=e["label"]) for i, e in enumerate(chosen)]

    def collate(self, rows: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        import torch

        labels = [r["labels"] for r in rows]
        batch = tokenizer.pad([{k: v for k, v in r.items() if k != "labels"} for r in rows], return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.num_labels == 1 else torch.long)
        return batch


@dataclass
class SquadTask(Task):
    """SQuAD on a named split of the dev articles ("dev-articles:train=A-B,eval=C-D"): the
    train part calibrates / fine-tunes, the eval part is scored. The split name travels with
    every number (records, tables)."""

    version: str = "1.1"
    split: str | None = None  # None: the dev articles halved in file order
    doc_stride: int = 128

    FILES = {"1.1": ["squad/dev-v1.1.rebuilt.json", "squad/dev-v1.1.json"], "2.0": ["squad/dev-v2.0.json"]}

    def configure(self, *, squad_split: str | None = None, **others: Any) -> None:
        super().configure(**others)
        self.split = squad_split

    def check_model(self, config: Any, spec: str) -> None:
        super().check_model(config, spec)
        _check_head(config, spec, self.name, "ForQuestionAnswering", None)

    def prepare(self, data_dir: Path | None, *, need_train: bool) -> None:
        from .squad import article_split_name, load_squad, split_articles

        if data_dir is None:
            try:
                examples = load_squad(None, self.version)
            except Exception as err:  # noqa: BLE001
                raise _hub_error(self.name, err, self.data_layout) from None
            source = f"hub:rajpurkar/{'squad' if self.version == '1.1' else 'squad_v2'}:validation"
        else:
            from ..data import require_files

            path = require_files(data_dir, {"dev": self.FILES[self.version]}, what=f"task {self.name!r}",
                                 layout=self.data_layout)["dev"]
            examples = load_squad(path, self.version)
            source = str(path.relative_to(data_dir))
        n_articles = 1 + max(e["article_index"] for e in examples)
        self.split = self.split or article_split_name(n_articles, n_articles // 2)
        self._train, self._eval = split_articles(examples, self.split)
        self.info = {"task": self.name, "split": f"{self.split} (eval part)", "squad_split": self.split,
                     "source": source, "eval_examples": len(self._eval), "train_examples": len(self._train),
                     "data_hash": data_hash([self.split, self._train, self._eval])}

    def _features(self, tokenizer: Any, n: int | None, seed: int, max_length: int) -> dict[str, list]:
        from .squad import prepare_train_features

        examples = list(self._train)
        if n is not None and n < len(examples):
            examples = random.Random(seed).sample(examples, n)
        stride = min(self.doc_stride, max_length // 2)
        return prepare_train_features(examples, tokenizer, max_length=max_length, doc_stride=stride)

    def calibration(self, tokenizer: Any, *, samples: int, seq_len: int, seed: int, batch_size: int) -> Any:
        import torch

        from tshrink.calibration import CalibrationData

        rows = self.finetune_rows(tokenizer, max_length=seq_len, limit=samples, seed=seed)[:samples]
        batches = []
        for i in range(0, len(rows), batch_size):
            batch = self.collate(rows[i:i + batch_size], tokenizer)
            # "labels" marks the batch as labelled for the host; QA heads take start/end positions
            batch["labels"] = torch.stack([batch["start_positions"], batch["end_positions"]], -1)  # (batch, 2)
            batches.append(batch)
        return CalibrationData(batches, source=f"squad {self.split} train part (random {len(rows)} windows, "
                               f"seed {seed})", meta={"kind": "squad", "labelled": True})

    def evaluate(self, model: Any, tokenizer: Any, *, device: str, limit: int | None, seq_len: int,
                 batch_size: int) -> EvalResult:
        from ..metrics.squad_metric.squad_scores import squad_scores
        from ..metrics.squad_v2_metric.squad_v2_scores import squad_v2_scores
        from .squad import SpanDecodeConfig, evaluate_squad

        examples = self._eval[:limit]
        v2 = self.version == "2.0"
        out = evaluate_squad(model, tokenizer, examples, batch_size=batch_size, device=device, max_length=seq_len,
                             doc_stride=min(self.doc_stride, seq_len // 2),
                             decode=SpanDecodeConfig(version_2_with_negative=v2))
        preds = [{"id": k, "prediction_text": v} | ({"no_answer_probability": 0.0} if v2 else {})
                 for k, v in out.predictions.items()]
        scores = (squad_v2_scores if v2 else squad_scores)(preds, out.references)
        return EvalResult({k: float(v) for k, v in scores.items() if isinstance(v, (int, float))},
                          {"split": self.info["split"], "examples": out.n_examples, "windows": out.n_features,
                           "max_length": seq_len, "doc_stride": min(self.doc_stride, seq_len // 2),
                           "metric": METRIC_NOTE.format("squad_v2" if v2 else "squad")})

    def finetune_rows(self, tokenizer: Any, *, max_length: int, limit: int | None, seed: int) -> list[dict[str, Any]]:
        feats = self._features(tokenizer, limit, seed, max_length)
        keys = [k for k in tokenizer.model_input_names if k in feats] + ["start_positions", "end_positions"]
        return [{k: feats[k][i] for k in keys} for i in range(len(feats["input_ids"]))]

    def collate(self, rows: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
        from .squad import pad_features

        return pad_features(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    def configure_model(self, config: Any) -> None:
        config.finetuning_task = self.name


def _register() -> None:
    from .glue import GLUE_TASKS

    for name, spec in GLUE_TASKS.items():
        split = "validation_matched" if name == "mnli" else "validation"
        train = "mnli" if name.startswith("mnli") else name
        aliases = (spec.folder,) + (("mnli-m",) if name == "mnli_matched" else ("mnli-mm",) if name == "mnli_mismatched" else ())
        main = "f1" if "f1" in spec.metrics else spec.main_metric  # MRPC / QQP are reported by F1
        register(GlueTask(
            name, "glue", "encoder", "sequence-classification", spec.metrics, main,
            description=f"GLUE {spec.folder} ({'regression' if spec.is_regression else 'classification'})",
            # calibration: 2048 examples drawn with replacement, the setting of Kwon et al.'s public code
            seq_len=128, calib_samples=2048, labelled_calibration=True, finetunable=True, num_labels=spec.num_labels,
            aliases=aliases, train_task=train, eval_split=split,
            data_layout=(f"<data>/{spec.folder}/{{train,{spec.splits[split]}}}.tsv (official GLUE TSV) or "
                         f"*.hf.tsv (Hugging Face export), also under <data>/glue/")))
    for name, version, metrics in (("squad", "1.1", ("exact_match", "f1")),
                                   ("squad_v2", "2.0", ("exact", "f1", "HasAns_f1", "NoAns_f1"))):
        register(SquadTask(
            name, "squad", "encoder", "question-answering", metrics, "f1",
            description=f"SQuAD v{version} on a named split of the dev articles (EM / F1, percent)",
            seq_len=384, calib_samples=128, labelled_calibration=True, finetunable=True,
            aliases=(f"squad{version}", f"squad-v{version}") if version == "1.1" else ("squad2", "squad-v2.0"),
            version=version, data_layout=f"<data>/{SquadTask.FILES[version][0]} (official SQuAD JSON)"))


_register()
