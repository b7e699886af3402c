"""The engine's three ASGI apps, each on its own port (as TorchServe's three APIs): inference
(servetool's /predictions and /ping, KServe's v1 and v2), management (the subset servetool's
client drives) and metrics. Token auth on inference and management: `Authorization: Bearer KEY`
with the key of key_file.json, compared in constant time; health probes need no key."""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from servetool.engines.kserve.batcher import QueueFull
from servetool.engines.kserve.context import decoded
from servetool.engines.kserve.registry import NotFound, Refused, Registry

OPEN_PATHS = ("/ping", "/v2/health/live", "/v2/health/ready", "/")


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "type": kind, "message": message}, status_code=status)


def _guard(app: FastAPI, key: str | None, open_paths: tuple[str, ...] = ()) -> None:
    @app.middleware("http")
    async def auth(request: Request, call_next):  # noqa: ANN001, ANN202
        if key is not None and request.url.path not in open_paths:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return _error(401, "Unauthorized", "Token Authorization failed: send "
                              "Authorization: Bearer KEY (the key is in the run folder's "
                              "key_file.json)")
        return await call_next(request)


async def _items(request: Request) -> dict[str, Any]:
    """The request as TorchServe's worker receives it: the body (or each multipart field)
    decoded by its content type, plus the query parameters."""
    item: dict[str, Any] = {k: v for k, v in request.query_params.items()}
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        for name, value in form.multi_items():
            if hasattr(value, "read"):
                item[name] = decoded(await value.read(), value.content_type or "")
            else:
                item[name] = value
        return item
    item["body"] = decoded(await request.body(), kind)  # empty too, as TorchServe passes it
    return item


def inference_app(registry: Registry, key: str | None, max_request_size: int) -> FastAPI:
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    _guard(app, key, OPEN_PATHS)
    repository = ModelRepository()
    registry.kserve_models = repository  # kept in step with the registry (server.py)
    dataplane = DataPlane(model_registry=repository)
    register_v1_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    register_v2_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    _kserve_errors(app)

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"status": "Healthy"}

    async def predict(request: Request, name: str, version: str | None) -> Response:
        size = int(request.headers.get("content-length") or 0)
        if size > max_request_size:
            return _error(413, "RequestTooLarge", f"the request is {size} bytes, more than the "
                          f"server's limit of {max_request_size}")
        try:
            entry = registry.get(name, version)
        except NotFound as exc:
            return _error(404, "ModelNotFoundException", str(exc))
        item = await _items(request)
        try:
            reply = await entry.batcher.submit(item)
        except QueueFull as exc:
            return _error(503, "ServiceUnavailableException",
                          f"Model \"{name}\" has no worker to serve inference request: {exc}")
        return Response(reply.body, status_code=reply.status, headers=reply.headers)

    # POST, and PUT as `curl -T FILE` sends (TorchServe takes both)
    @app.api_route("/predictions/{name}", methods=["POST", "PUT"])
    async def predict_default(request: Request, name: str) -> Response:
        return await predict(request, name, None)

    @app.api_route("/predictions/{name}/{version}", methods=["POST", "PUT"])
    async def predict_version(request: Request, name: str, version: str) -> Response:
        return await predict(request, name, version)

    return app


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


def management_app(registry: Registry, key: str | None, on_change: Any) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    _guard(app, key)

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

    return app


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
