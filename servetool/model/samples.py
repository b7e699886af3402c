"""Sample inputs of a model: its validation and calibration data as model inputs (images
preprocessed, texts tokenized, exactly as the handler does them), and the sentences the gate,
calibration and benchmarks feed a text model, tokenized by the handler's own encoder so they see
exactly what the worker will. Built on the spec, never imported by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import servetool
from servetool.model.spec import DataRef, ModelSpec, SpecError

SENTENCES = Path(servetool.__file__).with_name("resources") / "sentences.txt"


def sample_texts(spec: ModelSpec, count: int) -> list[str]:
    """`count` of the spec's sample sentences (text.samples), else of servetool's varied set
    (accents, CJK, emoji, numbers, a text longer than most models take), repeated as needed."""
    source = spec.text.samples if spec.text and spec.text.samples else SENTENCES
    texts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    return (texts * (count // max(len(texts), 1) + 1))[:count] if texts else []


def takes_pairs(spec: ModelSpec) -> bool:
    """A model that scores (query, passage) pairs: a reranker, or a one-score classifier (a
    cross-encoder served as text-classification). Its samples are pairs, so the gate runs the
    second segment (token_type_ids 1) the model is served with."""
    return spec.task == "text-reranking" or (spec.task == "text-classification"
                                             and spec.text is not None and spec.text.head == "score")


def sample_pairs(texts: list[str]) -> list[str]:
    """Each text's second segment: the next sample text (the last pairs with the first), so
    every pair mixes two of the varied sentences and the over-long one is cut in a pair too."""
    return [texts[(i + 1) % len(texts)] for i in range(len(texts))] if texts else []


def representative_texts(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """What text int8 is calibrated and gated on, and where each part comes from: servetool's
    varied set (scripts, accents, emoji, numbers, a text past max_length) plus the user's own
    texts (text.samples, calibration.texts), each text once. A user extends it in the spec."""
    sources = [("servetool's representative set", SENTENCES)]
    if spec.text and spec.text.samples:
        sources.append(("text.samples", spec.text.samples))
    texts = [line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines()]
    if spec.text and spec.text.samples:
        texts += [line.strip() for line in
                  spec.text.samples.read_text(encoding="utf-8").splitlines()]
    if spec.calibration is not None and spec.calibration.texts:
        sources.append(("calibration.texts", spec.calibration.path))
        texts += spec.calibration.plain_texts()
    named = [f"{what} ({path})" for what, path in sources]
    return list(dict.fromkeys(t for t in texts if t.strip())), named


def encode_texts(spec: ModelSpec, texts: list[str], pairs: list[str | None] | None = None) -> list:
    """Each text as the worker encodes it (handlers.text.Encoded: feeds, tokens, ...); a pair
    model's texts are paired (sample_pairs) unless `pairs` says otherwise."""
    from handlers.text import TextEncoder

    encoder = TextEncoder(str(spec.text.tokenizer), [i.name for i in spec.inputs],
                          spec.text.max_length, truncate=True, max_texts=max(len(texts), 1),
                          pair_truncation=spec.text.pair_truncation)
    if pairs is None and takes_pairs(spec):
        pairs = list(sample_pairs(texts))
    return encoder.encode(texts, pairs)


def collate_texts(spec: ModelSpec, encoded: list) -> dict[str, np.ndarray]:
    """Encoded texts as one batch of feeds, padded to the longest as the handler pads."""
    from handlers.batching import collate

    return collate([e.feeds for e in encoded], [i.as_dict() for i in spec.inputs])


def text_batch(spec: ModelSpec, texts: list[str]) -> dict[str, np.ndarray]:
    """Texts as one batch of the model's feeds, padded to the longest as the handler pads."""
    return collate_texts(spec, encode_texts(spec, texts))


def load_data(spec: ModelSpec, ref: DataRef) -> tuple[Any, Any]:
    """Model inputs (and labels, where known) of a validation or calibration set."""
    if ref.texts:
        return _load_texts(spec, ref)
    if ref.coco or (ref.images and spec.task == "object-detection"):
        # a detector's images, letterboxed as served (their boxes: detection_gate), all at
        # the full input size (one array)
        task = spec.detector(full_canvas=True)
        return np.stack([task.preprocess(data).examples[0][task.input_name]
                         for data in ref.detector_images()[0]]), None
    if not ref.images:
        return ref.load([i.name for i in spec.inputs])
    task = spec.image_task()
    names = spec.label_names() or []
    xs, ys = [], []
    for path, label in ref.image_files():
        xs.append(task.preprocess(path.read_bytes()))
        if label is not None:
            if label not in names:
                raise SpecError(f"{path}: folder {label!r} is not a label in {spec.labels}")
            ys.append(names.index(label))
    y = np.array(ys, np.int64) if ys and len(ys) == len(xs) else None
    return np.stack(xs), y


def _load_texts(spec: ModelSpec, ref: DataRef) -> tuple[Any, Any]:
    """Labelled texts, tokenized as the worker tokenizes them (one padded batch)."""
    names = spec.label_names() or []
    pairs = ref.labelled_texts()
    unknown = sorted({label for label, _ in pairs if label not in names})
    if unknown:
        raise SpecError(f"{ref.path}: label(s) {', '.join(map(repr, unknown[:5]))} are not "
                        f"the model's ({', '.join(names[:10])})")
    x = text_batch(spec, [text for _, text in pairs])
    return x, np.array([names.index(label) for label, _ in pairs], np.int64)
