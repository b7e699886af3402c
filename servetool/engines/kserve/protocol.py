"""KServe's v1 and Open Inference Protocol v2 bodies <-> the handler's requests.

A model is one kserve.Model per name, answering for its default version through the same batcher
as /predictions. Each element of a v2 input tensor is one request to the handler:
- a BYTES tensor: each element is a request body as /predictions takes it (image bytes, a JSON
  text), decoded as JSON when it parses, else passed as bytes. Binary bodies travel in the
  binary tensor extension, or as base64 text with the input's parameters {"content_type":
  "base64"} (JSON has no bytes);
- a numeric tensor (a `tensor` task's input): each row along the first axis is one request, as
  a JSON array.
The answers come back as one BYTES output, "answer", one JSON document per element. v1's
{"instances": [...]} takes each instance as one request ({"b64": ...} for binary) and answers
{"predictions": [...]}. A request any of whose elements the handler refuses answers that 4xx
(v2 and v1 have no per-element status), naming the element.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from servetool.engines.kserve.batcher import QueueFull, Reply
from servetool.engines.kserve.registry import NotFound, Registry

OUTPUT = "answer"


class ArchiveModel(Model):
    def __init__(self, name: str, registry: Registry) -> None:
        super().__init__(name)
        self.registry = registry
        self.ready = True

    def load(self) -> bool:
        self.ready = True
        return True

    async def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        try:
            version = self.registry.get(self.name)
        except NotFound as exc:
            raise InvalidInput(str(exc)) from None
        if isinstance(payload, InferRequest):
            items = _v2_items(payload)
        else:
            items = _v1_items(payload)
        try:
            replies = await asyncio.gather(*(version.batcher.submit(item) for item in items))
        except QueueFull as exc:
            raise InferenceError(str(exc), status=503) from None
        answers = [_answer(reply, i) for i, reply in enumerate(replies)]
        if response_headers is not None:
            response_headers["X-Model-Version"] = version.version
        if isinstance(payload, InferRequest):
            data = [json.dumps(a, separators=(",", ":")) for a in answers]
            return InferResponse(payload.id or "", self.name, [InferOutput(
                OUTPUT, [len(data)], "BYTES", data)], model_version=version.version)
        return {"predictions": answers}


def _v2_items(request: InferRequest) -> list[dict[str, Any]]:
    if len(request.inputs) != 1:
        raise InvalidInput(f"send one input tensor (each element one request); got "
                           f"{len(request.inputs)}")
    tensor = request.inputs[0]
    array = tensor.as_numpy()
    if tensor.datatype == "BYTES":
        base64_text = (tensor.parameters or {}).get("content_type") == "base64"
        items = []
        for value in array.reshape(-1):
            raw = value if isinstance(value, bytes) else str(value).encode()
            if base64_text:
                try:
                    raw = base64.b64decode(raw, validate=True)
                except ValueError:
                    raise InvalidInput("an element of the base64 input is not base64") from None
                items.append({"body": bytearray(raw)})
            else:
                items.append({"body": _decoded(raw)})
        return items
    if array.ndim == 0:
        raise InvalidInput("a numeric input needs a first (batch) axis: one request per row")
    return [{"body": row.tolist()} for row in np.asarray(array)]


def _v1_items(payload: dict[str, Any]) -> list[dict[str, Any]]:
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidInput('send {"instances": [...]}: one request per instance')
    items = []
    for instance in instances:
        if isinstance(instance, dict) and set(instance) == {"b64"}:
            try:
                instance = bytearray(base64.b64decode(instance["b64"], validate=True))
            except (ValueError, TypeError):
                raise InvalidInput("an instance's b64 is not base64") from None
        items.append({"body": instance})
    return items


def _decoded(value: bytes) -> Any:
    try:
        return json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return bytearray(value)


def _answer(reply: Reply, index: int) -> Any:
    body = json.loads(reply.body) if reply.body else None
    if reply.status >= 500:
        raise InferenceError(f"element {index}: {_message(body)}", status=reply.status)
    if reply.status >= 400:
        raise InvalidInput(f"element {index}: {_message(body)}")
    return body


def _message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)
    return str(body)
