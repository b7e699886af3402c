"""The text tasks: feature-extraction (sentence embeddings), text-classification and
token-classification. Each request may carry several texts; each text is one row of the batch
(handlers.batching.Rows) and the request is answered as a whole.

Answers (every list is per text, in request order):
- feature-extraction: {"embeddings": [[float, ...]], "dimensions": n, "tokens": [...],
  "truncated": [...]}; for an OpenAI-shaped request, OpenAI's {"object": "list", "data":
  [{"object": "embedding", "index": i, "embedding": [...]}], "model": name, "usage": {...}}.
  The exported model already pools (and normalises, where the spec says so): see
  servetool/export/transformers.py.
- text-classification: {"predictions": [[{"label", "score"}, ...]], "tokens", "truncated"}, the
  top_k labels by score (softmax; a sigmoid per label for multi-label models).
- token-classification: {"entities": [[{"entity_group", "score", "word", "start", "end"}, ...]],
  "tokens", "truncated"}: words labelled by their first token, neighbouring words of one entity
  joined (a B- tag starts a new one); start/end are character offsets into the text as sent.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from handlers.batching import Rows
from handlers.text import TextEncoder, TextRequest, parse_request


class TextTask:
    output_names: list[str] = []

    def __init__(self, config: dict[str, Any], labels: list[str] | None,
                 model_dir: str = ".") -> None:
        text = config.get("text") or {}
        names = [i["name"] for i in config.get("inputs") or []]
        self.encoder = TextEncoder(os.path.join(model_dir, text.get("tokenizer", "tokenizer.json")),
                                   names, int(text.get("max_length", 512)),
                                   bool(text.get("truncate", True)), int(text.get("max_texts", 32)))
        self.labels = labels
        self.top_k = int(config.get("top_k", 5))
        self.multi_label = bool(text.get("multi_label"))
        self.model_name = str(config.get("model_name") or "")

    def preprocess(self, payload: Any) -> Rows:
        request = parse_request(payload)
        encoded = self.encoder.encode(request.texts)
        return Rows([e.feeds for e in encoded], (request, encoded))

    def postprocess(self, rows: Rows) -> Any:
        request, encoded = rows.meta
        answers = [self.answer(out, enc, text) for out, enc, text in
                   zip(rows.outputs or [], encoded, request.texts, strict=True)]
        return self.wrap(answers, request, encoded)

    def answer(self, outputs: list[np.ndarray], encoded, text: str) -> Any:
        raise NotImplementedError

    def wrap(self, answers: list[Any], request: TextRequest, encoded) -> dict[str, Any]:
        raise NotImplementedError

    def _label(self, index: int) -> str:
        return self.labels[index] if self.labels and index < len(self.labels) else str(index)


def _report(encoded) -> dict[str, Any]:
    return {"tokens": [e.tokens for e in encoded], "truncated": [e.truncated for e in encoded]}


def _short_floats(vector: np.ndarray) -> list[float]:
    """The vector to 7 significant digits of its largest value, float32's precision: the JSON
    is half as long as float32 values written as float64 (8.4 -> 4.4 KB for 384 numbers) and
    quicker to write, while no value moves by more than 5e-8 x its largest."""
    vector = np.asarray(vector, dtype=np.float64).reshape(-1)
    top = float(np.abs(vector).max()) if vector.size else 0.0
    if not np.isfinite(top) or top == 0.0:
        return vector.tolist()
    return np.round(vector, max(0, 7 - int(np.ceil(np.log10(top))))).tolist()


class FeatureExtraction(TextTask):
    def answer(self, outputs, encoded, text):
        return _short_floats(outputs[0])

    def wrap(self, answers, request, encoded):
        if request.style == "openai":
            used = sum(e.tokens for e in encoded)
            return {"object": "list", "model": self.model_name,
                    "data": [{"object": "embedding", "index": i, "embedding": vector}
                             for i, vector in enumerate(answers)],
                    "usage": {"prompt_tokens": used, "total_tokens": used}}
        return {"embeddings": answers, "dimensions": len(answers[0]) if answers else 0,
                **_report(encoded)}


def _scores(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if multi_label:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TextClassification(TextTask):
    def answer(self, outputs, encoded, text):
        scores = _scores(np.asarray(outputs[0]).reshape(-1), self.multi_label)
        order = np.argsort(-scores, kind="stable")[:self.top_k]
        return [{"label": self._label(int(i)), "score": float(scores[i])} for i in order]

    def wrap(self, answers, request, encoded):
        return {"predictions": answers, **_report(encoded)}


class TokenClassification(TextTask):
    def answer(self, outputs, encoded, text):
        scores = _scores(np.asarray(outputs[0]), False)  # [tokens, labels]
        words: list[tuple[str, float, int, int]] = []  # (tag, score, start, end) per word
        seen: set[int] = set()
        for t, word in enumerate(encoded.word_ids):
            if word is None or encoded.special[t]:
                continue
            if word in seen:  # a later piece of the word: it widens the word, keeps its label
                tag, score, start, _ = words[-1]
                words[-1] = (tag, score, start, encoded.offsets[t][1])
                continue
            seen.add(word)
            best = int(scores[t].argmax())
            start, end = encoded.offsets[t]
            words.append((self._label(best), float(scores[t, best]), start, end))
        return self._group(words, text)

    @staticmethod
    def _group(words: list[tuple[str, float, int, int]], text: str) -> list[dict[str, Any]]:
        entities: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        for tag, score, start, end in words:
            prefix, _, kind = tag.partition("-") if tag[:2] in ("B-", "I-") else ("", "", tag)
            if kind in ("O", ""):
                current = None
                continue
            if current is not None and current["entity_group"] == kind and prefix != "B":
                current["end"] = end
                current["scores"].append(score)
                continue
            current = {"entity_group": kind, "start": start, "end": end, "scores": [score]}
            entities.append(current)
        for entity in entities:
            scores = entity.pop("scores")
            entity["score"] = float(np.mean(scores))
            entity["word"] = text[entity["start"]:entity["end"]]
        return [{k: e[k] for k in ("entity_group", "score", "word", "start", "end")}
                for e in entities]

    def wrap(self, answers, request, encoded):
        return {"entities": answers, **_report(encoded)}


TEXT_TASKS = {"feature-extraction": FeatureExtraction, "text-classification": TextClassification,
              "token-classification": TokenClassification}
