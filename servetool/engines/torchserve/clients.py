"""The clients' front: the HTTP paths the OpenAI SDK and TEI-style clients call, mapped to
TorchServe's `/predictions/{model}` on the same server.

  POST /v1/embeddings   OpenAI's embeddings API (the body is forwarded as it came: the handler
                        answers OpenAI's shape, usage and "truncated" included)
  GET  /v1/models       OpenAI's model list: every registered model, with its task
  POST /embed           TEI: {"inputs": text | [texts]} -> [[float, ...], ...]
  POST /predict         TEI: {"inputs": text | [a, b] (one pair) | [texts or pairs]} -> the
                        classifier's predictions (one text: its list; several: a list per text)
  POST /rerank          TEI: {"query", "texts", ...} forwarded as it came -> [{"index", "score"}]

Which model: OpenAI's `model` field names it; without one (and on TEI's paths, which have no
such field, unless `?model=NAME` is given) it is the only registered model whose task fits the
path (feature-extraction for embeddings, a one-score head for /rerank, text-classification for
/predict). None or several fitting, or an unknown name, is an error in the API's own shape
(OpenAI: {"error": {"message", "type", "code"}}; TEI: {"error", "error_type"}).

Auth: the Bearer key is TorchServe's inference key (`servetool token`), so the SDK's api_key is
the key a user already has. Run by servetool.engines.torchserve.pod's keeper beside TorchServe on
the local target (`python -m servetool.engines.torchserve.clients HOST:PORT`,
SERVETOOL_CLIENTS_UPSTREAM the inference port).
"""

from __future__ import annotations

import asyncio
import hmac
import http.client
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from servetool.engines.torchserve import pod

SERVER = "servetool-clients"
EMBED = "embeddings"
RERANK = "reranking"
CLASSIFY = "classification"
ROUTES = {("POST", "/v1/embeddings"): ("openai", EMBED), ("GET", "/v1/models"): ("openai", None),
          ("POST", "/embed"): ("tei", EMBED), ("POST", "/predict"): ("tei", CLASSIFY),
          ("POST", "/rerank"): ("tei", RERANK)}
TEI_KEYS = {"inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "raw_scores"}
MODELS_TTL_S = 2.0  # a model registered or removed is seen within this long


class ClientError(Exception):
    """An answer in the API's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def fits(kind: str, task: str, head: str | None) -> bool:
    """Whether a model of `task` (with text head `head`) answers the path's kind."""
    if kind == EMBED:
        return task == "feature-extraction"
    if kind == RERANK:
        return task == "text-reranking" or (task == "text-classification" and head == "score")
    return task in ("text-classification", "text-reranking")


def error_body(api: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    if api == "openai":
        kind = ("authentication_error" if status == 401 else "invalid_request_error"
                if status < 500 else "server_error")
        return {"error": {"message": message, "type": kind, "code": code, "param": None}}
    kind = {401: "Unauthorized", 413: "Validation", 503: "Overloaded"}.get(
        status, "Validation" if status < 500 else "Backend")
    return {"error": message, "error_type": kind}


def upstream_message(data: bytes) -> str:
    """The sentence in an error answer of servetool's handler or of TorchServe itself."""
    try:
        body = json.loads(data)
    except ValueError:
        return data[:300].decode("utf-8", "replace") or "no detail"
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)
    return str(body)


class ModelTable:
    """The registered models and their tasks (read from each archive's model-config.yaml)."""

    def __init__(self) -> None:
        self.cached: tuple[float, dict[str, dict[str, Any]]] = (-MODELS_TTL_S, {})
        self.tasks: dict[tuple[str, int], tuple[str, str | None]] = {}

    def models(self) -> dict[str, dict[str, Any]]:
        stamp, found = self.cached
        if time.monotonic() - stamp < MODELS_TTL_S:
            return found
        status, data = pod.call("GET", "management", "/models?limit=1000")
        if status != 200:
            raise ClientError(503, f"TorchServe's management API answered {status}: "
                                   f"{upstream_message(data)}")
        store = Path(pod.config().get("model_store", "."))
        found = {}
        for entry in json.loads(data).get("models", []):
            task, head = self.task(store / entry.get("modelUrl", ""))
            found[entry["modelName"]] = {"task": task, "head": head}
        self.cached = (time.monotonic(), found)
        return found

    def task(self, archive: Path) -> tuple[str, str | None]:
        try:
            key = (str(archive), archive.stat().st_mtime_ns)
        except OSError:
            return "unknown", None
        if key not in self.tasks:
            self.tasks[key] = archive_task(archive)
        return self.tasks[key]

    def choose(self, kind: str, named: str | None) -> str:
        models = self.models()
        if named:
            if named not in models:
                raise ClientError(404, f"no model named {named!r} is deployed here (deployed: "
                                       f"{', '.join(sorted(models)) or 'none'})", "model_not_found")
            if not fits(kind, **models[named]):
                raise ClientError(400, f"model {named!r} is a {models[named]['task']} model; "
                                       f"this path needs one for {kind} (fitting: "
                                       f"{', '.join(self.fitting(kind)) or 'none deployed'})",
                                  "model_not_supported")
            return named
        fitting = self.fitting(kind)
        if len(fitting) != 1:
            raise ClientError(400 if fitting else 404,
                              f"{len(fitting)} deployed models answer {kind} "
                              f"({', '.join(fitting) or 'none'}): name one (OpenAI's \"model\" "
                              "field, or ?model=NAME on TEI's paths)", "model_not_found")
        return fitting[0]

    def fitting(self, kind: str) -> list[str]:
        return sorted(n for n, m in self.models().items() if fits(kind, **m))


def archive_task(archive: Path) -> tuple[str, str | None]:
    """(task, text head) from a servetool archive's model-config.yaml; ("unknown", None) for an
    archive servetool did not build."""
    import yaml

    try:
        with zipfile.ZipFile(archive) as zf:
            manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
            config = yaml.safe_load(zf.read(manifest["model"]["configFile"])) or {}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, yaml.YAMLError):
        return "unknown", None
    handler = config.get("handler") or {}
    return str(handler.get("task") or "unknown"), (handler.get("text") or {}).get("head")


def tei_body(kind: str, body: Any) -> tuple[dict[str, Any], bool]:
    """The handler's request for a TEI /embed or /predict body, and whether one text (or pair)
    was sent (TEI then answers it alone)."""
    if not isinstance(body, dict) or "inputs" not in body:
        raise ClientError(400, "send a JSON object {\"inputs\": text or [texts]}")
    unknown = sorted(set(body) - TEI_KEYS)
    if unknown:
        raise ClientError(400, f"unknown key(s) {', '.join(map(repr, unknown))} (known: "
                               f"{', '.join(sorted(TEI_KEYS))})")
    for key in ("normalize", "truncate"):
        if body.get(key) is False:
            raise ClientError(400, f"\"{key}\": false is not served here: the model's spec "
                                   f"decides (text.{key}); leave \"{key}\" out")
    inputs = body["inputs"]
    if kind == CLASSIFY and isinstance(inputs, list) and len(inputs) == 2 and \
            all(isinstance(t, str) for t in inputs):  # TEI reads ["a", "b"] as one pair
        return {"inputs": [inputs]}, True
    return {"inputs": inputs}, isinstance(inputs, str)


def tei_answer(kind: str, answer: dict[str, Any], single: bool) -> Any:
    items = answer.get("embeddings" if kind == EMBED else "predictions", [])
    return items[0] if single and kind == CLASSIFY else items


class ClientsFront:
    """The ASGI app (under pod.serve_asgi)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.table = ModelTable()

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        api, kind = ROUTES.get((scope["method"], scope["path"]), ("openai" if scope["path"]
                                                                  .startswith("/v1/") else
                                                                  "tei", None))
        try:
            status, payload = await self.handle(scope, receive, api, kind)
        except ClientError as exc:
            status, payload = exc.status, error_body(api, exc.status, str(exc), exc.code)
        except pod.Refusal as exc:  # the body's limits and deadlines (pod.read_body)
            await self.reply(send, exc.status, error_body(api, exc.status, str(exc)), exc.close)
            return
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            status, payload = 503, error_body(api, 503, f"TorchServe is not answering: {exc}")
        await self.reply(send, status, payload)

    async def reply(self, send, status: int, payload: Any, close: bool = False) -> None:
        headers = [("Content-Type", "application/json")]
        if status == 401:
            headers.append(("WWW-Authenticate", f'Bearer realm="{SERVER}"'))
        await pod.send_reply(send, status, headers, json.dumps(payload).encode(), close, SERVER)

    def authorized(self, scope: dict) -> bool:
        if not pod.token_auth():
            return True
        token, key = pod.bearer(scope).encode(), pod.KEYS.get("inference") or ""
        return bool(token) and hmac.compare_digest(token, key.encode())

    async def handle(self, scope: dict, receive, api: str, kind: str | None) -> tuple[int, Any]:
        if (scope["method"], scope["path"]) not in ROUTES:
            raise ClientError(404, f"no such path: {scope['method']} {scope['path']} (served: "
                                   f"{', '.join(f'{m} {p}' for m, p in ROUTES)})")
        if not await asyncio.to_thread(self.authorized, scope):
            raise ClientError(401, "missing or wrong key: send 'Authorization: Bearer KEY' with "
                                   "the inference key `servetool token` prints (the OpenAI SDK's "
                                   "api_key)", "invalid_api_key")
        if kind is None:  # GET /v1/models
            models = await asyncio.to_thread(self.table.models)
            return 200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "servetool",
                 "task": m["task"]} for name, m in sorted(models.items())]}
        limit = int(pod.config().get("max_request_size", "6553500"))
        raw = await pod.read_body(scope, receive, limit, "max_request_size")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ClientError(400, f"the body is not valid JSON ({exc})") from None
        named = body.get("model") if api == "openai" and isinstance(body, dict) else \
            query_model(scope)
        if named is not None and not isinstance(named, str):
            raise ClientError(400, f"\"model\" must be a model's name, got {named!r:.40}")
        model = await asyncio.to_thread(self.table.choose, kind, named)
        single = False
        if api == "tei" and kind != RERANK:
            body, single = tei_body(kind, body)
        status, data = await asyncio.to_thread(self.predict, model, json.dumps(body).encode())
        if status != 200:
            return status, error_body(api, status, upstream_message(data))
        answer = json.loads(data)
        return 200, tei_answer(kind, answer, single) if api == "tei" and kind != RERANK else answer

    def predict(self, model: str, body: bytes) -> tuple[int, bytes]:
        key = pod.KEYS.get("inference")
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn = http.client.HTTPConnection(*self.upstream, timeout=300)
        try:
            conn.request("POST", f"/predictions/{quote(model, safe='')}", body=body,
                         headers=headers)
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()


def query_model(scope: dict) -> str | None:
    """TEI's paths have no model field: ?model=NAME picks one where several fit."""
    try:
        target = pod.canonical_target(pod.raw_target(scope))
    except pod.TargetError as exc:
        raise ClientError(400, f"bad request target: {exc}") from None
    return target.params.get("model")


def main(argv: list[str]) -> int:
    listen = argv[0] if argv else os.environ.get("SERVETOOL_CLIENTS_LISTEN", "127.0.0.1:8083")
    host, _, port = listen.rpartition(":")
    upstream = os.environ.get("SERVETOOL_CLIENTS_UPSTREAM", "127.0.0.1:8080")
    up_host, _, up_port = upstream.rpartition(":")
    pod.serve_asgi(ClientsFront((up_host.strip("[]"), int(up_port))), host.strip("[]") or
                   "127.0.0.1", int(port), "clients")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
