"""A client for TorchServe's inference and management APIs, with token auth handled.

The keys live in the server's key_file.json; they are read on every call (TorchServe rewrites the
file when a key is regenerated) and renewed with the API key once they expire, so a user never has
to copy a token by hand for servetool's own calls.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from servetool.errors import ServetoolError
from servetool.torchserve import ServerState

EXPIRY_MARGIN_S = 30


class APIError(ServetoolError):
    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def read_keys(key_file: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(key_file.read_text())
    except (OSError, ValueError):
        return {}


def _expired(entry: dict[str, Any]) -> bool:
    stamp = entry.get("expiration time")
    if not stamp:
        return False
    try:
        # TorchServe writes e.g. "2026-11-22T03:40:35.123Z"
        from datetime import datetime

        when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return False
    return when - EXPIRY_MARGIN_S < time.time()


class Client:
    def __init__(self, state: ServerState, timeout_s: float = 30.0,
                 keys: Callable[[], dict[str, dict[str, Any]]] | None = None,
                 keys_where: str | None = None) -> None:
        """`keys` reads the server's key_file.json (default: from state.key_file on this machine;
        the Docker target reads it inside the container)."""
        self.state = state
        self._keys = keys or (lambda: read_keys(state.key_file))
        self._keys_where = keys_where or str(state.key_file)
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.trust_env = False  # loopback: never through an HTTP proxy from the env

    # --- auth ----------------------------------------------------------------------------------
    def token(self, kind: str) -> str | None:
        """The current `inference` or `management` key, renewed when it has expired."""
        if not self.state.token_auth:
            return None
        keys = self._keys()
        entry = keys.get(kind)
        if entry is None:
            raise APIError(f"TorchServe has token authorization on but {self._keys_where} has no "
                           f"{kind} key (yet)")
        if _expired(entry) and "API" in keys:
            self._renew(kind, keys["API"]["key"])
            getattr(self._keys, "invalidate", lambda: None)()
            entry = self._keys().get(kind, entry)
        return entry["key"]

    def _renew(self, kind: str, api_key: str) -> None:
        self.session.get(f"{self.state.url('management')}/token", params={"type": kind},
              headers={"Authorization": f"Bearer {api_key}"}, timeout=self.timeout_s)

    def _headers(self, kind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        token = self.token(kind)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _call(self, method: str, api: str, path: str, *, timeout: float | None = None,
              ok: tuple[int, ...] = (200,), **kwargs: Any) -> requests.Response:
        kind = "inference" if api == "inference" else "management"
        headers = self._headers(kind, kwargs.pop("headers", None))
        url = f"{self.state.url(api)}{path}"
        try:
            reply = self.session.request(method, url, headers=headers,
                                         timeout=timeout or self.timeout_s, **kwargs)
        except requests.ConnectionError:
            raise APIError(f"cannot reach TorchServe at {self.state.url(api)} (is it running? "
                           "`servetool status`)") from None
        except requests.Timeout:
            waited = timeout or self.timeout_s
            raise APIError(f"{method} {path} got no answer within {waited:.0f} s") from None
        if reply.status_code not in ok:
            raise APIError(f"{method} {path} answered {reply.status_code}: {_message(reply)}",
                           reply.status_code, reply.text)
        return reply

    # --- inference API -------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self._call("GET", "inference", "/ping", timeout=5).json()

    def predict(self, model: str, body: bytes, content_type: str, version: str | None = None,
                timeout: float | None = None) -> requests.Response:
        """POST /predictions; returns the reply whatever its status (the caller judges it)."""
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self._call("POST", "inference", path, data=body, timeout=timeout,
                          headers={"Content-Type": content_type}, ok=tuple(range(100, 600)))

    # --- management API ------------------------------------------------------------------------
    def list_models(self) -> list[dict[str, Any]]:
        models, token = [], None
        while True:
            params = {"limit": 100, **({"next_page_token": token} if token else {})}
            page = self._call("GET", "management", "/models", params=params).json()
            models += page.get("models", [])
            token = page.get("nextPageToken")
            if not token:
                return models

    def describe(self, name: str, version: str | None = "all") -> list[dict[str, Any]]:
        """One entry per version ("all"), for one version, or for the default version (None)."""
        path = f"/models/{name}" + (f"/{version}" if version else "")
        return self._call("GET", "management", path).json()

    def has_model(self, name: str) -> bool:
        return any(m["modelName"] == name for m in self.list_models())

    def register(self, archive_name: str, name: str, workers: int, timeout: float) -> dict[str, Any]:
        params = {"url": archive_name, "model_name": name, "initial_workers": workers,
                  "synchronous": "true"}
        return self._call("POST", "management", "/models", params=params, timeout=timeout).json()

    def unregister(self, name: str, version: str | None = None, timeout: float = 60) -> None:
        path = f"/models/{name}" + (f"/{version}" if version else "")
        self._call("DELETE", "management", path, timeout=timeout)

    def scale(self, name: str, min_workers: int, max_workers: int, version: str | None = None,
              timeout: float = 120) -> dict[str, Any]:
        path = f"/models/{name}" + (f"/{version}" if version else "")
        params = {"min_worker": min_workers, "max_worker": max_workers, "synchronous": "true"}
        return self._call("PUT", "management", path, params=params, timeout=timeout,
                          ok=(200, 202)).json()

    def set_default(self, name: str, version: str) -> None:
        self._call("PUT", "management", f"/models/{name}/{version}/set-default")

    def metrics(self) -> str:
        url = f"{self.state.url('metrics')}/metrics"
        return self.session.get(url, timeout=self.timeout_s).text


def _message(reply: requests.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return reply.text.strip()[:300] or reply.reason
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:300]
    return str(body)[:300]
