"""Text in: the request shapes a text model accepts, and the tokenizer that turns texts into the
model's named inputs. Shared by the handler's text tasks and servetool's gate, so the gate feeds
the artifact exactly what the worker will.

Requests (documented in the README, "Text models"):
- a raw UTF-8 body: one text;
- JSON `{"inputs": "text"}` or `{"inputs": ["a", "b", ...]}`, or a bare JSON list of texts;
- text pairs (a cross-encoder's query and passage, NLI's premise and hypothesis), tokenized as
  one input with a second segment: `{"inputs": [["q", "p"], ...]}` (inside the list, a list of
  two texts is a pair; at the top level `["a", "b"]` stays two texts), or the transformers
  pipeline's `{"inputs": {"text": "q", "text_pair": "p"}}` (or a list of such objects);
- TEI's rerank body `{"query": "q", "texts": ["p1", ...], "return_text", "raw_scores",
  "truncate"}`: one pair per passage (parse_rerank; answered by handlers.text_tasks.rerank_answer);
- the OpenAI embeddings shape `{"input": "text" | ["a", ...], "model": ..., "encoding_format":
  "float" | "base64", "dimensions": n}` (answered in OpenAI's shape by feature-extraction).

The tokenizer is Hugging Face's Rust `tokenizers` with the model's own tokenizer.json, without the
padding a saved file may carry (batches are padded per batch, to their longest text, later).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.errors import RequestError

OPENAI_KEYS = {"input", "model", "encoding_format", "user", "dimensions"}
RERANK_KEYS = {"query", "texts", "return_text", "raw_scores", "truncate", "truncation_direction"}
PAIR_KEYS = {"text", "text_pair"}  # the transformers text-classification pipeline's pair
JSON_START = (b"{", b"[")


@dataclass
class TextRequest:
    texts: list[str]
    style: str  # "single" (one text), "list" (several), "openai" (the embeddings API's shape),
    # "rerank" (TEI's {query, texts}: texts holds the query once per passage)
    pairs: list[str | None] | None = None  # each text's second segment, where it is a pair
    options: dict[str, Any] = field(default_factory=dict)  # rerank: return_text, raw_scores, ...


def _decode_utf8(data: bytes | bytearray) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"the body is not valid UTF-8 text (byte 0x{data[exc.start]:02x} "
                                f"at position {exc.start})") from None


def parse_request(payload: Any) -> TextRequest:
    """The texts of one request, whichever accepted shape it came in (RequestError otherwise)."""
    if isinstance(payload, (bytes, bytearray)):
        stripped = bytes(payload[:64]).lstrip()
        if stripped.startswith(JSON_START):
            try:
                return parse_request(json.loads(_decode_utf8(payload)))
            except (ValueError, RecursionError) as exc:
                # "[1] Introduction" is a text; a body opening with "{" is a JSON object that
                # does not parse (TorchServe hands over the bytes of invalid JSON as they came)
                if stripped.startswith(b"{"):
                    raise RequestError(400, f"the body starts like a JSON object but is not valid "
                                            f"JSON ({exc}); send a text as {{\"inputs\": \"...\"}} "
                                            "or as text/plain") from None
        return TextRequest([_decode_utf8(payload)], "single")
    if isinstance(payload, str):
        return TextRequest([payload], "single")
    if isinstance(payload, list):
        return _listed(payload, "the JSON list")
    if isinstance(payload, dict):
        if "inputs" in payload:
            unknown = sorted(set(payload) - {"inputs"})
            if unknown:
                raise RequestError(400, f"unknown key(s) {', '.join(map(repr, unknown))} beside "
                                        "\"inputs\"")
            value = payload["inputs"]
            if isinstance(value, str):
                return TextRequest([value], "single")
            if isinstance(value, dict):  # the pipeline's {"text", "text_pair"}: one pair
                first, second = _pair(value, '"inputs"')
                return TextRequest([first], "single", [second])
            return _listed(value, '"inputs"')
        if "input" in payload:
            unknown = sorted(set(payload) - OPENAI_KEYS)
            if unknown:
                raise RequestError(400, f"unknown key(s) {', '.join(map(repr, unknown))} in an "
                                        "embeddings request")
            value = payload["input"]
            texts = [value] if isinstance(value, str) else _texts(value, '"input"')
            return TextRequest(texts, "openai", options=_openai_options(payload))
        if "query" in payload or "texts" in payload:
            return parse_rerank(payload)
        raise RequestError(400, "a JSON request carries its text(s) under \"inputs\" (or "
                                "\"input\", as OpenAI's embeddings API; or TEI's rerank "
                                "{\"query\", \"texts\"})")
    raise RequestError(400, "send text: a UTF-8 body, or JSON {\"inputs\": \"text\" or [texts]}")


def _openai_options(payload: dict[str, Any]) -> dict[str, Any]:
    """encoding_format (the OpenAI SDK asks for base64 unless told otherwise) and dimensions."""
    encoding = payload.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError(400, f"encoding_format {encoding!r:.40} is not served: send \"float\" "
                                "or \"base64\"")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
        raise RequestError(400, f"dimensions must be a whole number, got {dimensions!r:.40}")
    if dimensions is not None and dimensions < 1:
        raise RequestError(400, f"dimensions must be at least 1, got {dimensions}")
    return {"encoding_format": encoding, "dimensions": dimensions}


def parse_rerank(payload: dict[str, Any]) -> TextRequest:
    """TEI's /rerank body: the query paired with each text, in the texts' order."""
    unknown = sorted(set(payload) - RERANK_KEYS)
    if unknown:
        raise RequestError(400, f"unknown key(s) {', '.join(map(repr, unknown))} in a rerank "
                                f"request (known: {', '.join(sorted(RERANK_KEYS))})")
    query = payload.get("query")
    if not isinstance(query, str):
        raise RequestError(400, "a rerank request needs \"query\": a text, got "
                                f"{type(query).__name__}")
    texts = _texts(payload.get("texts"), '"texts"')
    options: dict[str, Any] = {}
    for key in ("return_text", "raw_scores", "truncate"):
        value = payload.get(key)
        if value is not None and not isinstance(value, bool):
            raise RequestError(400, f"\"{key}\" must be true or false, got {value!r:.40}")
        options[key] = value
    direction = payload.get("truncation_direction")
    if direction is not None and str(direction).lower() != "right":
        raise RequestError(400, f"truncation_direction {direction!r:.40} is not served: a long "
                                "pair loses tokens from its end (\"right\")")
    return TextRequest([query] * len(texts), "rerank", list(texts), options)


def _listed(value: Any, where: str) -> TextRequest:
    """A JSON list under "inputs" (or bare): texts, and pairs among them (a list of two texts,
    or a {"text", "text_pair"} object, in an item)."""
    if not isinstance(value, list) or not any(isinstance(i, (list, dict)) for i in value):
        return TextRequest(_texts(value, where), "list")
    firsts: list[str] = []
    seconds: list[str | None] = []
    for i, item in enumerate(value):
        first, second = _pair(item, f"{where}[{i}]") if isinstance(item, (list, dict)) else (
            _texts([item], f"{where}[{i}]")[0], None)
        firsts.append(first)
        seconds.append(second)
    return TextRequest(firsts, "list", seconds)


def _pair(item: list | dict, where: str) -> tuple[str, str | None]:
    if isinstance(item, dict):
        unknown = sorted(set(item) - PAIR_KEYS)
        if unknown or "text" not in item:
            raise RequestError(400, f"{where} must be {{\"text\": ..., \"text_pair\": ...}}, got "
                                    f"key(s) {', '.join(map(repr, sorted(item)))}")
        second = item.get("text_pair")
        return _texts([item["text"]], f"{where}.text")[0], (
            None if second is None else _texts([second], f"{where}.text_pair")[0])
    if len(item) != 2 or not all(isinstance(t, str) for t in item):
        raise RequestError(400, f"{where} is a list of {len(item)} item(s): a text pair is a list "
                                "of two texts [first, second] (query and passage, premise and "
                                "hypothesis)")
    return item[0], item[1]


def _texts(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise RequestError(400, f"{where} must be a text or a list of texts, got "
                                f"{type(value).__name__}")
    if not value:
        raise RequestError(400, f"{where} is an empty list: send at least one text")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RequestError(400, f"{where}[{i}] is {type(item).__name__}, not a text (token ids "
                                    "are not accepted: send the text)")
    return value


@dataclass
class Encoded:
    """One text as the model's inputs (no batch axis), and what the answer reports about it."""

    feeds: dict[str, np.ndarray]
    tokens: int  # tokens fed to the model, special tokens included
    truncated: bool
    offsets: list[tuple[int, int]] = field(default_factory=list)  # per token, into the text
    special: list[int] = field(default_factory=list)  # 1 where a token is a special one
    word_ids: list[int | None] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # the tokens as strings ("##rie")


# The first cut of a long text, in characters per token of max_length: English runs 4 to 5 a
# token in WordPiece and BPE vocabularies; a text of longer words is cut again further on.
CHARS_PER_TOKEN = 8
_SPACE = re.compile(r"\s")


def whitespace_cut(text: str, limit: int) -> int | None:
    """Where to cut `text` to tokenize about `limit` characters of it: the start of the last
    whitespace run at or before `limit` (or of the first one after it, for a text whose first
    `limit` characters hold none); None where the text is not longer than `limit` or holds no
    whitespace to cut at (it is then tokenized whole)."""
    if len(text) <= limit:
        return None
    end = limit
    while end > 0 and not text[end].isspace():
        end -= 1
    if end == 0:  # no whitespace within the limit: the first one past it
        found = _SPACE.search(text, limit)
        if found is None:
            return None
        end = found.start()
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end or None


def check_unicode(texts: list[str], seconds: list[str | None]) -> None:
    """Refuse a text the tokenizer cannot take, in words a sender understands: a lone UTF-16
    surrogate (JSON lets "\\ud800" through) is not Unicode text."""
    for i, (text, second) in enumerate(zip(texts, seconds, strict=True)):
        for part, value in (("", text), (" (its second text)", second)):
            if value is None:
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = "the text" if len(texts) == 1 else f"text {i}"
                raise RequestError(400, f"{where}{part} holds a lone surrogate "
                                        f"U+{ord(value[exc.start]):04X} at character {exc.start}, "
                                        "which is not valid Unicode (a \\uD800-\\uDFFF escape "
                                        "without its pair): send the character itself or its "
                                        "full surrogate pair") from None


class TextEncoder:
    """tokenizer.json -> the named int64 inputs one text gives (input_ids, attention_mask, ...)."""

    def __init__(self, tokenizer_file: str, input_names: list[str], max_length: int,
                 truncate: bool = True, max_texts: int = 32,
                 pair_truncation: str = "longest_first") -> None:
        # The worker runs one request after another and several workers share the cores: the
        # tokenizer's own thread pool would only oversubscribe them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.tokenizer.no_padding()
        # a pair over max_length: longest_first (sentence-transformers' CrossEncoder, TEI) cuts
        # the longer text token by token; only_second cuts the passage alone
        self.pair_truncation = pair_truncation
        self.tokenizer.enable_truncation(max_length, strategy=pair_truncation)
        self.input_names = input_names
        self.max_length = max_length
        self.truncate = truncate
        self.max_texts = max_texts

    def _full_length(self, text: str, pair: str | None = None) -> int:
        self.tokenizer.no_truncation()
        try:
            return len(self.tokenizer.encode(text, pair).ids)
        finally:
            self.tokenizer.enable_truncation(self.max_length, strategy=self.pair_truncation)

    def _encode_all(self, texts: list[str], pairs: list[str | None] | None) -> list:
        if not pairs or all(p is None for p in pairs):
            try:
                return self.tokenizer.encode_batch(texts)
            except Exception as exc:  # lone surrogates are caught before; name anything else
                raise RequestError(400, f"the model's tokenizer cannot read the text "
                                        f"({type(exc).__name__}: {str(exc)[:200]})") from None
        items = [t if p is None else (t, p) for t, p in zip(texts, pairs, strict=True)]
        try:
            return self.tokenizer.encode_batch(items)
        except Exception:  # only_second with a first text that leaves no room: name which
            for i, (text, pair) in enumerate(zip(texts, pairs, strict=True)):
                try:
                    self.tokenizer.encode(text, pair)
                except Exception:
                    raise RequestError(413, f"pair {i}: its first text takes "
                                            f"{self._full_length(text)} tokens, which leaves no "
                                            f"room within this model's {self.max_length} for "
                                            "the second (text.pair_truncation: only_second cuts "
                                            "the second text only); send a shorter first text"
                                       ) from None
            raise

    def _encode_cut(self, texts: list[str], pairs: list[str | None] | None
                    ) -> tuple[list, list[int | None]]:
        """The encodings of _encode_all, but a long text (not a pair) is tokenized only as far as
        its truncation needs: up to a whitespace (whitespace_cut). Each token of that prefix is
        the whole text's (pre-tokenizers split words at whitespace; normalisers work per
        character), so once the prefix alone is over max_length, its truncated encoding is the
        whole text's. A prefix still under it is tried again four times as long. A 6 MB text
        costs milliseconds instead of seconds. Also returns where each text was cut (None: whole)."""
        if pairs and any(p is not None for p in pairs):
            return self._encode_all(texts, pairs), [None] * len(texts)
        limit = self.max_length * CHARS_PER_TOKEN
        cuts = [whitespace_cut(text, limit) for text in texts]
        encodings = self._encode_all([t if c is None else t[:c] for t, c in zip(texts, cuts,
                                                                               strict=True)], None)
        for i, text in enumerate(texts):
            grown = limit
            while cuts[i] is not None and not encodings[i].overflowing:
                grown *= 4
                cuts[i] = whitespace_cut(text, grown)
                encodings[i] = self._encode_all([text if cuts[i] is None else text[:cuts[i]]],
                                                None)[0]
        return encodings, cuts

    def encode(self, texts: list[str], pairs: list[str | None] | None = None,
               truncate: bool | None = None) -> list[Encoded]:
        """Each text (with its pair's second text, where `pairs` has one) as the model's inputs;
        `truncate` overrides the spec's for this request (TEI's rerank "truncate")."""
        truncate = self.truncate if truncate is None else truncate
        if len(texts) > self.max_texts:
            raise RequestError(413, f"{len(texts)} texts in one request; this model takes at most "
                                    f"{self.max_texts} (text.max_texts)")
        seconds = pairs or [None] * len(texts)
        for i, (text, second) in enumerate(zip(texts, seconds, strict=True)):
            if second is None and not text.strip():
                raise RequestError(400, ("the text is empty" if len(texts) == 1 else
                                         f"text {i} is empty") + ": nothing to embed or classify")
            if second is not None and not (text.strip() and second.strip()):
                raise RequestError(400, f"pair {i}: its {'first' if not text.strip() else 'second'}"
                                        " text is empty: send two non-empty texts")
        check_unicode(texts, seconds)
        result = []
        encodings, cuts = self._encode_cut(texts, pairs)
        for i, (text, enc) in enumerate(zip(texts, encodings, strict=True)):
            truncated = bool(enc.overflowing)
            if truncated and not truncate:
                where = "the text" if len(texts) == 1 else f"text {i}"
                length = (f"over {self.max_length} tokens long (its first {cuts[i]:,} characters "
                          "already are)" if cuts[i] else
                          f"{self._full_length(text, seconds[i])} tokens long")
                raise RequestError(413, f"{where} is {length}; this model takes at most "
                                        f"{self.max_length} (the "
                                        "spec or the request refuses longer texts instead of "
                                        "truncating them)")
            columns = {"input_ids": enc.ids, "attention_mask": enc.attention_mask,
                       "token_type_ids": enc.type_ids}
            feeds = {name: np.asarray(columns[name], dtype=np.int64) for name in self.input_names}
            result.append(Encoded(feeds, len(enc.ids), truncated, list(enc.offsets),
                                  list(enc.special_tokens_mask), list(enc.word_ids),
                                  list(enc.tokens)))
        return result
