"""Text in: the request shapes a text model accepts, and the tokenizer that turns texts into the
model's named inputs. Shared by the handler's text tasks and servetool's gate, so the gate feeds
the artifact exactly what the worker will.

Requests (documented in the README, "Text models"):
- a raw UTF-8 body: one text;
- JSON `{"inputs": "text"}` or `{"inputs": ["a", "b", ...]}`, or a bare JSON list of texts;
- the OpenAI embeddings shape `{"input": "text" | ["a", ...], "model": ..., "encoding_format":
  "float"}` (answered in OpenAI's shape by feature-extraction).

The tokenizer is Hugging Face's Rust `tokenizers` with the model's own tokenizer.json, without the
padding a saved file may carry (batches are padded per batch, to their longest text, later).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.errors import RequestError

OPENAI_KEYS = {"input", "model", "encoding_format", "user", "dimensions"}
JSON_START = (b"{", b"[")


@dataclass
class TextRequest:
    texts: list[str]
    style: str  # "single" (one text), "list" (several), "openai" (the embeddings API's shape)


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
        return TextRequest(_texts(payload, "the JSON list"), "list")
    if isinstance(payload, dict):
        if "inputs" in payload:
            unknown = sorted(set(payload) - {"inputs"})
            if unknown:
                raise RequestError(400, f"unknown key(s) {', '.join(map(repr, unknown))} beside "
                                        "\"inputs\"")
            value = payload["inputs"]
            if isinstance(value, str):
                return TextRequest([value], "single")
            return TextRequest(_texts(value, '"inputs"'), "list")
        if "input" in payload:
            unknown = sorted(set(payload) - OPENAI_KEYS)
            if unknown:
                raise RequestError(400, f"unknown key(s) {', '.join(map(repr, unknown))} in an "
                                        "embeddings request")
            if payload.get("encoding_format", "float") != "float":
                raise RequestError(400, "encoding_format must be \"float\" (the only one served)")
            value = payload["input"]
            texts = [value] if isinstance(value, str) else _texts(value, '"input"')
            return TextRequest(texts, "openai")
        raise RequestError(400, "a JSON request carries its text(s) under \"inputs\" (or "
                                "\"input\", as OpenAI's embeddings API)")
    raise RequestError(400, "send text: a UTF-8 body, or JSON {\"inputs\": \"text\" or [texts]}")


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


class TextEncoder:
    """tokenizer.json -> the named int64 inputs one text gives (input_ids, attention_mask, ...)."""

    def __init__(self, tokenizer_file: str, input_names: list[str], max_length: int,
                 truncate: bool = True, max_texts: int = 32) -> None:
        # The worker runs one request after another and several workers share the cores: the
        # tokenizer's own thread pool would only oversubscribe them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.input_names = input_names
        self.max_length = max_length
        self.truncate = truncate
        self.max_texts = max_texts

    def _full_length(self, text: str) -> int:
        self.tokenizer.no_truncation()
        try:
            return len(self.tokenizer.encode(text).ids)
        finally:
            self.tokenizer.enable_truncation(self.max_length)

    def encode(self, texts: list[str]) -> list[Encoded]:
        if len(texts) > self.max_texts:
            raise RequestError(413, f"{len(texts)} texts in one request; this model takes at most "
                                    f"{self.max_texts} (text.max_texts)")
        for i, text in enumerate(texts):
            if not text.strip():
                raise RequestError(400, ("the text is empty" if len(texts) == 1 else
                                         f"text {i} is empty") + ": nothing to embed or classify")
        result = []
        for i, (text, enc) in enumerate(zip(texts, self.tokenizer.encode_batch(texts), strict=True)):
            truncated = bool(enc.overflowing)
            if truncated and not self.truncate:
                where = "the text" if len(texts) == 1 else f"text {i}"
                raise RequestError(413, f"{where} is {self._full_length(text)} tokens long; this "
                                        f"model takes at most {self.max_length} (the spec refuses "
                                        "longer texts instead of truncating them)")
            columns = {"input_ids": enc.ids, "attention_mask": enc.attention_mask,
                       "token_type_ids": enc.type_ids}
            feeds = {name: np.asarray(columns[name], dtype=np.int64) for name in self.input_names}
            result.append(Encoded(feeds, len(enc.ids), truncated, list(enc.offsets),
                                  list(enc.special_tokens_mask), list(enc.word_ids)))
        return result
