"""Sample sentences as model inputs: what the gate, calibration and benchmarks feed a text model,
tokenized by the handler's own encoder so they see exactly what the worker will."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the spec loads labelled texts through this module
    from servetool.spec import ModelSpec

SENTENCES = Path(__file__).with_name("resources") / "sentences.txt"


def sample_texts(spec: ModelSpec, count: int) -> list[str]:
    """`count` of the spec's sample sentences (text.samples), else of servetool's varied set
    (accents, CJK, emoji, numbers, a text longer than most models take), repeated as needed."""
    source = spec.text.samples if spec.text and spec.text.samples else SENTENCES
    texts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    return (texts * (count // max(len(texts), 1) + 1))[:count] if texts else []


def encode_texts(spec: ModelSpec, texts: list[str]) -> list:
    """Each text as the worker encodes it (handlers.text.Encoded: feeds, tokens, ...)."""
    from handlers.text import TextEncoder

    encoder = TextEncoder(str(spec.text.tokenizer), [i.name for i in spec.inputs],
                          spec.text.max_length, truncate=True, max_texts=max(len(texts), 1))
    return encoder.encode(texts)


def collate_texts(spec: ModelSpec, encoded: list) -> dict[str, np.ndarray]:
    """Encoded texts as one batch of feeds, padded to the longest as the handler pads."""
    from handlers.batching import collate

    return collate([e.feeds for e in encoded], [i.as_dict() for i in spec.inputs])


def text_batch(spec: ModelSpec, texts: list[str]) -> dict[str, np.ndarray]:
    """Texts as one batch of the model's feeds, padded to the longest as the handler pads."""
    return collate_texts(spec, encode_texts(spec, texts))
