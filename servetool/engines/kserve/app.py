"""The engine's three ASGI apps, each on its own port (as TorchServe's three APIs): inference
(servetool's /predictions and /ping, KServe's v1 and v2), management (the subset servetool's
client drives) and metrics. Token auth on inference and management: `Authorization: Bearer KEY`
with the key of key_file.json, compared in constant time; health probes need no key."""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from servetool.engines.kserve.batcher import QueueFull
from servetool.engines.kserve.context import decoded
from servetool.engines.kserve.registry import NotFound, Refused, Registry

OPEN_PATHS = ("/ping", "/v2/health/live", "/v2/health/ready", "/")


def _error(status: int, kind: str, message: str) -> Response:
    return Response(json.dumps({"code": status, "type": kind, "message": message}),
                    status_code=status, media_type="application/json")


class Guarded:
    """Token auth as a plain ASGI wrapper (Starlette's @middleware("http") costs a task and a
    stream per request, which shows at thousands of requests a second)."""

    def __init__(self, app: Any, key: str | None, open_paths: tuple[str, ...] = ()) -> None:
        self.app, self.key, self.open_paths = app, key, open_paths

    def authorized(self, scope: dict[str, Any]) -> bool:
        if self.key is None or scope["path"] in self.open_paths:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value[7:] if value[:7].lower() == b"bearer " else b""
                return hmac.compare_digest(token, self.key.encode())
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.authorized(scope):
            await respond(send, 401, {"code": 401, "type": "Unauthorized", "message":
                                      "Token Authorization failed: send Authorization: Bearer "
                                      "KEY (the key is in the run folder's key_file.json)"})
            return
        await self.app(scope, receive, send)


async def respond(send: Any, status: int, body: Any, headers: dict[str, str] | None = None
                  ) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if not any(k == b"content-type" for k, _ in raw):
        raw.append((b"content-type", b"application/json"))
    raw.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class TooLarge(Exception):
    pass


async def read_body(receive: Any, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(size)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def request_item(scope: dict[str, Any], receive: Any, limit: int) -> dict[str, Any]:
    """The request as TorchServe's worker receives it: the body (or each multipart field)
    decoded by its content type, plus the query parameters."""
    from urllib.parse import parse_qsl

    item: dict[str, Any] = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    kind = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), "")
    if kind.startswith("multipart/form-data"):
        from starlette.requests import Request

        form = await Request(scope, receive).form()
        for name, value in form.multi_items():
            if hasattr(value, "read"):
                item[name] = decoded(await value.read(), value.content_type or "")
            else:
                item[name] = value
        return item
    item["body"] = decoded(await read_body(receive, limit), kind)  # empty too, as TorchServe
    return item


class InferenceFront:
    """The hot path answered without a framework: POST/PUT /predictions/NAME[/VERSION] and
    /ping; everything else (KServe's v1 and v2) goes to the FastAPI app."""

    def __init__(self, registry: Registry, fallback: Any, max_request_size: int) -> None:
        self.registry, self.fallback, self.limit = registry, fallback, max_request_size

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/predictions/") or path == "/ping"):
            await self.fallback(scope, receive, send)
            return
        if path == "/ping":
            await respond(send, 200, {"status": "Healthy"})
            return
        if scope["method"] not in ("POST", "PUT"):  # PUT: `curl -T FILE` (TorchServe takes it)
            await respond(send, 405, {"code": 405, "type": "MethodNotAllowedException",
                                      "message": "Requested method is not allowed, please refer "
                                                 "to API document."})
            return
        parts = path[len("/predictions/"):].split("/")
        if len(parts) > 2 or not parts[0]:
            await respond(send, 404, {"code": 404, "type": "ResourceNotFoundException",
                                      "message": "Requested resource is not found, please refer "
                                                 "to API document."})
            return
        await self.predict(scope, receive, send, parts[0], parts[1] if len(parts) > 1 else None)

    async def predict(self, scope: dict[str, Any], receive: Any, send: Any, name: str,
                      version: str | None) -> None:
        try:
            entry = self.registry.get(name, version)
        except NotFound as exc:
            await respond(send, 404, {"code": 404, "type": "ModelNotFoundException",
                                      "message": str(exc)})
            return
        try:
            item = await request_item(scope, receive, self.limit)
        except TooLarge as exc:
            await respond(send, 413, {"code": 413, "type": "RequestTooLarge", "message":
                                      f"the request is over {exc.args[0]} bytes, more than the "
                                      f"server's limit of {self.limit}"})
            return
        try:
            reply = await entry.batcher.submit(item)
        except QueueFull as exc:
            await respond(send, 503, {"code": 503, "type": "ServiceUnavailableException",
                                      "message": f"Model \"{name}\" has no worker to serve "
                                                 f"inference request: {exc}"})
            return
        await respond(send, reply.status, reply.body, reply.headers)


def inference_app(registry: Registry, key: str | None, max_request_size: int) -> Any:
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    repository = ModelRepository()
    registry.kserve_models = repository  # kept in step with the registry (server.py)
    dataplane = DataPlane(model_registry=repository)
    register_v1_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    register_v2_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    _kserve_errors(app)
    return Guarded(InferenceFront(registry, app, max_request_size), key, OPEN_PATHS)


def _kserve_errors(app: FastAPI) -> None:
    from kserve.errors import (
        InferenceError,
        InvalidInput,
        ModelNotFound,
        ModelNotReady,
        generic_exception_handler,
        inference_error_handler,
        invalid_input_handler,
        model_not_found_handler,
        model_not_ready_handler,
        not_implemented_error_handler,
    )

    app.add_exception_handler(InvalidInput, invalid_input_handler)
    app.add_exception_handler(InferenceError, inference_error_handler)
    app.add_exception_handler(ModelNotFound, model_not_found_handler)
    app.add_exception_handler(ModelNotReady, model_not_ready_handler)
    app.add_exception_handler(NotImplementedError, not_implemented_error_handler)
    app.add_exception_handler(Exception, generic_exception_handler)


def management_app(registry: Registry, key: str | None, on_change: Any) -> Any:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def answer(call: Any) -> Any:
        async def run(*args: Any) -> Response:
            try:
                result = await call(*args)
            except NotFound as exc:
                return _error(404, "ModelNotFoundException", str(exc))
            except Refused as exc:
                return _error(exc.status, "BadRequestException" if exc.status < 500
                              else "InternalServerException", str(exc))
            if isinstance(result, str):
                result = {"status": result}
            return Response(json.dumps(result, indent=2), media_type="application/json")
        return run

    @app.get("/models")
    async def listing() -> Response:
        return await answer(_async(registry.listing))()

    @app.post("/models")
    async def register(url: str = "", model_name: str | None = None,
                       initial_workers: int = 1) -> Response:
        async def go() -> str:
            message = await registry.register(url, model_name, initial_workers)
            on_change()
            return message
        return await answer(go)()

    @app.get("/models/{name}")
    async def describe_default(name: str) -> Response:
        return await answer(_async(registry.describe))(name, None)

    @app.get("/models/{name}/{version}")
    async def describe(name: str, version: str) -> Response:
        return await answer(_async(registry.describe))(name, version)

    @app.put("/models/{name}")
    async def scale_default(name: str, min_worker: int = 1) -> Response:
        return await answer(registry.scale)(name, None, min_worker)

    @app.put("/models/{name}/{version}")
    async def scale(name: str, version: str, min_worker: int = 1) -> Response:
        return await answer(registry.scale)(name, version, min_worker)

    @app.put("/models/{name}/{version}/set-default")
    async def set_default(name: str, version: str) -> Response:
        return await answer(_async(registry.set_default))(name, version)

    async def remove(name: str, version: str | None) -> Response:
        async def go() -> str:
            message = await registry.unregister(name, version)
            on_change()
            return message
        return await answer(go)()

    @app.delete("/models/{name}")
    async def unregister_default(name: str) -> Response:
        return await remove(name, None)

    @app.delete("/models/{name}/{version}")
    async def unregister(name: str, version: str) -> Response:
        return await remove(name, version)

    return Guarded(app, key)


def metrics_app(exposition: Any) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(exposition(), media_type="text/plain; version=0.0.4")

    return app


def _async(call: Any) -> Any:
    async def run(*args: Any) -> Any:
        return call(*args)
    return run
