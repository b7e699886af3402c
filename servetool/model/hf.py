"""What a local Hugging Face model folder holds, read from its files (no transformers import).

The spec reads it to check a `source: {transformers: DIR}` folder offline and to choose defaults
the folder already states: the inputs its tokenizer produces for this model, the pooling and
normalisation a sentence-transformers folder declares, the labels of a classifier, the longest
input the model takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER = "tokenizer.json"
IMAGE_PROCESSOR = "preprocessor_config.json"
# Longer inputs cost quadratic attention time; a model may allow more, a spec may ask for more.
DEFAULT_MAX_LENGTH = 512


def is_image_folder(folder: Path) -> bool:
    """An image model's folder: an image processor's settings and no tokenizer."""
    return (folder / IMAGE_PROCESSOR).is_file() and not (folder / TOKENIZER).is_file()


def missing_files(folder: Path) -> list[str]:
    """The files a folder lacks to be loaded offline: config, weights, the fast tokenizer (an
    image model's folder: its preprocessor_config.json instead)."""
    needed = ("config.json",) if is_image_folder(folder) else ("config.json", TOKENIZER)
    missing = [name for name in needed if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHTS):
        missing.append(" or ".join(WEIGHTS))
    return missing


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


def input_names(config: dict[str, Any]) -> list[str]:
    """What the model's forward takes from the tokenizer: token type ids only where the model has
    more than one type (BERT: 2; RoBERTa: 1, DistilBERT: none)."""
    names = ["input_ids", "attention_mask"]
    if int(config.get("type_vocab_size") or 0) > 1:
        names.append("token_type_ids")
    return names


def vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size")
    return int(size) if isinstance(size, int) and size > 0 else None


def max_length(folder: Path, config: dict[str, Any]) -> int:
    """The longest input: the smaller of what the position embeddings and the tokenizer allow."""
    limits = [DEFAULT_MAX_LENGTH]
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        # RoBERTa-style models offset positions by the padding index (514 -> 512 tokens)
        limits.append(positions - 2 if config.get("model_type") in ("roberta", "xlm-roberta",
                                                                      "camembert") else positions)
    st_config = folder / "sentence_bert_config.json"  # what sentence-transformers trained with
    if st_config.is_file():
        declared = read_json(st_config).get("max_seq_length")
        if isinstance(declared, int) and declared > 0:
            limits.append(declared)
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        declared = read_json(tok_config).get("model_max_length")
        if isinstance(declared, int) and 0 < declared < 10**6:  # huge values mean "unset"
            limits.append(declared)
    return min(limits)


def sentence_pooling(folder: Path) -> tuple[str | None, bool]:
    """(pooling, normalize) a sentence-transformers folder declares, else (None, False)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None, False
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except ValueError:
        return None, False
    pooling, normalize = None, False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            cfg = folder / str(module.get("path", "")) / "config.json"
            settings = read_json(cfg) if cfg.is_file() else {}
            if settings.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif settings.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
    return pooling, normalize


def labels(config: dict[str, Any]) -> list[str] | None:
    """A classifier's labels in id order, from config.json's id2label."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        ordered = sorted((int(k), str(v)) for k, v in id2label.items())
    except ValueError:
        return None
    if [i for i, _ in ordered] != list(range(len(ordered))):
        return None
    return [name for _, name in ordered]


def multi_label(config: dict[str, Any]) -> bool:
    return config.get("problem_type") == "multi_label_classification"


# The task each Hugging Face head serves, by the class name's suffix in config.json's
# `architectures` (what save_pretrained wrote): loading such a folder as a base model would drop
# the head the folder was trained with.
HEAD_TASKS = (("ForSequenceClassification", "text-classification"),
              ("ForTokenClassification", "token-classification"))


def head_task(config: dict[str, Any]) -> str | None:
    """The task the folder's trained head serves, or None for a base model (no head)."""
    for name in config.get("architectures") or []:
        for suffix, task in HEAD_TASKS:
            if str(name).endswith(suffix):
                return task
    return None


def num_labels(config: dict[str, Any]) -> int:
    """The head's outputs: id2label's size (what save_pretrained writes), else num_labels."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    declared = config.get("num_labels")
    return int(declared) if isinstance(declared, int) and declared > 0 else 2


def head_kind(config: dict[str, Any]) -> str:
    """How a sequence classifier's outputs read: `classes` (softmax), `multi_label` (a sigmoid
    per label), `score` (one output: a cross-encoder's relevance, a regression), `regression`
    (several raw outputs)."""
    if multi_label(config):
        return "multi_label"
    if num_labels(config) == 1:
        return "score"
    return "regression" if config.get("problem_type") == "regression" else "classes"


def score_activation(config: dict[str, Any]) -> str | None:
    """The activation sentence-transformers' CrossEncoder applies to this folder's scores, where
    config.json names one (v4+: sentence_transformers.activation_fn; older: sbert_ce_default_
    activation_function): `sigmoid` or `raw`; None where it names none or another one (see
    activation_name)."""
    return {"Sigmoid": "sigmoid", "Identity": "raw"}.get(activation_name(config) or "")


def activation_name(config: dict[str, Any]) -> str | None:
    """The class name of the CrossEncoder activation config.json declares, if any."""
    st = config.get("sentence_transformers")
    path = (st.get("activation_fn") if isinstance(st, dict) else None) or config.get(
        "sbert_ce_default_activation_function")
    return path.rsplit(".", 1)[-1] if isinstance(path, str) else None
