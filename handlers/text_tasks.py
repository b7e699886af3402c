"""The text tasks: feature-extraction (sentence embeddings), text-classification and
token-classification. Each request may carry several texts; each text is one row of the batch
(handlers.batching.Rows) and the request is answered as a whole.

Answers (every list is per text, in request order):
- feature-extraction: {"embeddings": [[float, ...]], "dimensions": n, "tokens": [...],
  "truncated": [...]}; for an OpenAI-shaped request, OpenAI's {"object": "list", "data":
  [{"object": "embedding", "index": i, "embedding": [...]}], "model": name, "usage": {...}}.
  The exported model already pools (and normalises, where the spec says so): see
  servetool/convert/export/transformers.py.
- text-classification (and text-reranking), by the head config.json declares (text.head):
  {"predictions": [...], "activation", "tokens", "truncated"} with, per text or pair,
  classes: the top_k [{"label", "score"}] by softmax; multi_label: every label whose sigmoid is
  >= text.threshold ("threshold" in the answer), highest first, never cut at top_k; score (one
  output, a cross-encoder): {"score"}, a sigmoid (CrossEncoder's default) or the raw logit
  (text.score); regression: [{"label", "score"}] for every output in id order. An answer to
  pairs says how long pairs were cut ("truncation": longest_first | only_second).
  TEI's rerank body is answered in TEI's shape by rerank_answer (a score head only).
- token-classification: {"entities": [[{"entity_group", "score", "word", "start", "end"}, ...]],
  "tokens", "truncated"}, as transformers' token-classification pipeline with the spec's
  aggregation_strategy (text.aggregation: first, simple, average, max; "O" left out); start/end
  are character offsets into the text as sent and "word" is the text between them.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import numpy as np

from handlers.batching import Rows
from handlers.errors import RequestError
from handlers.text import TextEncoder, TextRequest, parse_request


class TextTask:
    output_names: list[str] = []
    takes_pairs = False  # a second segment: the classifiers' (cross-encoders, NLI)

    def __init__(self, config: dict[str, Any], labels: list[str] | None,
                 model_dir: str = ".") -> None:
        text = config.get("text") or {}
        names = [i["name"] for i in config.get("inputs") or []]
        self.encoder = TextEncoder(os.path.join(model_dir, text.get("tokenizer", "tokenizer.json")),
                                   names, int(text.get("max_length", 512)),
                                   bool(text.get("truncate", True)), int(text.get("max_texts", 32)),
                                   str(text.get("pair_truncation", "longest_first")))
        self.labels = labels
        self.top_k = int(config.get("top_k", 5))
        self.multi_label = bool(text.get("multi_label"))
        # archives written before heads were read from config.json name only multi_label
        self.head = str(text.get("head") or ("multi_label" if self.multi_label else "classes"))
        self.score_activation = str(text.get("score", "sigmoid"))
        self.threshold = float(text.get("threshold", 0.5))
        self.aggregation = str(text.get("aggregation", "first"))
        self.task_name = str(config.get("task") or "")
        self.model_name = str(config.get("model_name") or "")
        self.normalize = bool(text.get("normalize"))  # feature-extraction's vectors: unit length

    def preprocess(self, payload: Any) -> Rows:
        request = parse_request(payload)
        self.check_request(request)
        encoded = self.encoder.encode(request.texts, request.pairs,
                                      request.options.get("truncate"))
        return Rows([e.feeds for e in encoded], (request, encoded))

    def check_request(self, request: TextRequest) -> None:
        """Refuse a shape this task does not answer, naming the one it does."""
        if request.style == "rerank" and self.head != "score":
            raise RequestError(400, "a rerank request ({\"query\", \"texts\"}) is answered by a "
                                    "model with one score per pair (a cross-encoder, task "
                                    f"text-reranking); this model is {self.task_name}"
                                    + (f" with a {self.head} head: send {{\"inputs\": [[query, "
                                       "passage], ...]}" if self.takes_pairs else ""))
        if request.pairs and any(p is not None for p in request.pairs) and not self.takes_pairs:
            raise RequestError(400, "text pairs ([first, second] or {\"text\", \"text_pair\"}) "
                                    "are for text-classification and text-reranking models; this "
                                    f"model is {self.task_name}: send texts")

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
            return self.openai_answer(answers, request, encoded)
        return {"embeddings": answers, "dimensions": len(answers[0]) if answers else 0,
                **_report(encoded)}


    def openai_answer(self, answers: list[list[float]], request: TextRequest,
                      encoded) -> dict[str, Any]:
        """OpenAI's embeddings answer: usage counted by this worker's tokenizer (special tokens
        included, as fed to the model), "dimensions" honoured, base64 as the SDK asks by default
        (float32 little-endian, which it decodes with numpy), and servetool's "truncated"."""
        size = request.options.get("dimensions")
        vectors = [self.shortened(v, size) for v in answers] if size else answers
        as_base64 = request.options.get("encoding_format") == "base64"
        used = sum(e.tokens for e in encoded)
        return {"object": "list", "model": self.model_name,
                "data": [{"object": "embedding", "index": i,
                          "embedding": _base64(v) if as_base64 else v}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": used, "total_tokens": used},
                "truncated": [e.truncated for e in encoded]}

    def shortened(self, vector: list[float], size: int) -> list[float]:
        """The first `size` values (a Matryoshka-trained model's coarser embedding), L2-normalised
        again where the model's vectors are normalised (text.normalize)."""
        if size > len(vector):
            raise RequestError(400, f"dimensions {size} is more than this model's {len(vector)}: "
                                    f"send 1 to {len(vector)}, or leave dimensions out")
        cut = np.asarray(vector[:size], dtype=np.float64)
        norm = float(np.linalg.norm(cut))
        if self.normalize and norm > 0:
            cut = cut / norm
        return _short_floats(cut)


def _base64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _scores(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if multi_label:
        return _sigmoid(logits)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def rerank_answer(logits: list[float] | np.ndarray, passages: list[str], activation: str,
                  raw_scores: bool = False, return_text: bool = False) -> list[dict[str, Any]]:
    """TEI's /rerank answer: [{"index", "score", "text"?}] sorted by score, highest first (ties
    in request order). `logits`: the head's one output per passage; `activation` the spec's
    (sigmoid, TEI's and CrossEncoder's default, or raw); raw_scores gives the logit."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    scores = logits if raw_scores or activation == "raw" else _sigmoid(logits)
    order = np.argsort(-scores, kind="stable")
    return [{"index": int(i), "score": float(scores[i]),
             **({"text": passages[i]} if return_text else {})} for i in order]


class TextClassification(TextTask):
    takes_pairs = True

    def answer(self, outputs, encoded, text):
        return np.asarray(outputs[0], dtype=np.float64).reshape(-1)  # read in wrap, per head

    def activation(self) -> str:
        return {"classes": "softmax", "multi_label": "sigmoid"}.get(self.head,
                                                                     self.score_activation)

    def predictions(self, logits: np.ndarray) -> Any:
        """One text's (or pair's) answer, as its head reads (see the module's docstring)."""
        if self.head in ("score", "regression"):
            values = _sigmoid(logits) if self.score_activation == "sigmoid" else logits
            if self.head == "score":
                return {"score": float(values[0])}
            return [{"label": self._label(i), "score": float(v)} for i, v in enumerate(values)]
        scores = _scores(logits, self.head == "multi_label")
        order = np.argsort(-scores, kind="stable")
        if self.head == "multi_label":  # every label past the threshold, however many
            order = [i for i in order if scores[i] >= self.threshold]
        else:
            order = order[:self.top_k]
        return [{"label": self._label(int(i)), "score": float(scores[i])} for i in order]

    def wrap(self, answers, request, encoded):
        if request.style == "rerank":
            return rerank_answer([a[0] for a in answers], request.pairs or [], self.activation(),
                                 bool(request.options.get("raw_scores")),
                                 bool(request.options.get("return_text")))
        body = {"predictions": [self.predictions(a) for a in answers],
                "activation": self.activation(), **_report(encoded)}
        if self.head == "multi_label":
            body["threshold"] = self.threshold
        if request.pairs and any(p is not None for p in request.pairs):
            body["truncation"] = self.encoder.pair_truncation
        return body


class TextReranking(TextClassification):
    """A cross-encoder: one score per (query, passage) pair; TEI's rerank body or pairs."""


Word = tuple[str, float, int, int]  # (label, score, start, end): a token or word, labelled


class TokenClassification(TextTask):
    """As transformers' TokenClassificationPipeline (postprocess with ignore_labels ["O"]) with
    aggregation_strategy text.aggregation, on the worker's tokenizer."""

    def __init__(self, config: dict[str, Any], labels: list[str] | None,
                 model_dir: str = ".") -> None:
        super().__init__(config, labels, model_dir)
        model = self.encoder.tokenizer.model
        # the pipeline's test for a tokenizer that marks word pieces ("##" in WordPiece): a
        # piece is then a subword when its token is longer than its text; else a heuristic
        self.word_aware = bool(getattr(model, "continuing_subword_prefix", None))
        unk = getattr(model, "unk_token", None)
        self.unk_id = self.encoder.tokenizer.token_to_id(unk) if unk else None

    def answer(self, outputs, encoded, text):
        scores = _scores(np.asarray(outputs[0]), False)  # [tokens, labels]
        tokens = self._tokens(scores, encoded, text)
        if self.aggregation == "simple":
            labelled = [self._pick(s, start, end) for s, start, end, _ in tokens]
        else:
            labelled = [self._word(group) for group in _words(tokens)]
        return _group(labelled, text)

    def _tokens(self, scores: np.ndarray, encoded, text: str
                ) -> list[tuple[np.ndarray, int, int, bool]]:
        """(scores, start, end, is_subword) per real token, as the pipeline's pre-entities."""
        ids = encoded.feeds.get("input_ids")
        found = []
        for t, (start, end) in enumerate(encoded.offsets):
            if encoded.special[t]:
                continue
            if self.word_aware:
                subword = len(encoded.pieces[t]) != end - start
            else:
                subword = start > 0 and " " not in text[start - 1:start + 1]
            if ids is not None and int(ids[t]) == self.unk_id:
                subword = False
            found.append((scores[t], start, end, subword))
        return found

    def _pick(self, scores: np.ndarray, start: int, end: int) -> Word:
        best = int(scores.argmax())
        return self._label(best), float(scores[best]), start, end

    def _word(self, group: list[tuple[np.ndarray, int, int, bool]]) -> Word:
        start, end = group[0][1], group[-1][2]
        if self.aggregation == "first":
            chosen = group[0][0]
        elif self.aggregation == "max":  # the piece most sure of its label
            chosen = max(group, key=lambda g: float(g[0].max()))[0]
        else:  # average: the mean of the pieces' distributions
            chosen = np.nanmean(np.stack([g[0] for g in group]), axis=0)
        return self._pick(chosen, start, end)

    def wrap(self, answers, request, encoded):
        return {"entities": answers, **_report(encoded)}


def _words(tokens: list) -> list[list]:
    """Tokens joined into words: a subword joins the word before it."""
    words: list[list] = []
    for token in tokens:
        if words and token[3]:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _tag(label: str) -> tuple[str, str]:
    """(B or I, entity type); a label without a B-/I- prefix continues like I-."""
    return (label[0], label[2:]) if label[:2] in ("B-", "I-") else ("I", label)


def _group(labelled: list[Word], text: str) -> list[dict[str, Any]]:
    """Neighbours of one entity type joined (a B- starts a new one), as the pipeline's
    group_entities; the group's score is its members' mean; "O" groups are left out."""
    groups: list[list[Word]] = []
    for item in labelled:
        if groups and _tag(item[0])[1] == _tag(groups[-1][-1][0])[1] and _tag(item[0])[0] != "B":
            groups[-1].append(item)
        else:
            groups.append([item])
    entities = []
    for group in groups:
        kind = group[0][0].split("-", 1)[-1]
        if kind == "O":
            continue
        start, end = group[0][2], group[-1][3]
        entities.append({"entity_group": kind, "score": float(np.mean([g[1] for g in group])),
                         "word": text[start:end], "start": start, "end": end})
    return entities


TEXT_TASKS = {"feature-extraction": FeatureExtraction, "text-classification": TextClassification,
              "token-classification": TokenClassification, "text-reranking": TextReranking}
