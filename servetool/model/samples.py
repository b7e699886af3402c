"""Sample sentences as model inputs: what the gate, calibration and benchmarks feed a text model,
tokenized by the handler's own encoder so they see exactly what the worker will."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import servetool

if TYPE_CHECKING:  # the spec loads labelled texts through this module
    from servetool.model.spec import ModelSpec

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
