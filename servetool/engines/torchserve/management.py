"""A client for TorchServe's inference and management APIs, with token auth handled.

The keys live in the server's key_file.json; they are read on every call (TorchServe rewrites the
file when a key is regenerated) and renewed with the API key once they have expired, never before:
renewing makes TorchServe revoke the old key at once, and other clients may still be using it.
Management calls go through servetool's front with the front's own key (see
servetool/engines/torchserve/pod.py).

Every model name and version is checked and percent-encoded before it goes into a URL path.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from servetool.engines.torchserve.state import DEFAULT_MAX_REQUEST_SIZE, ServerState
from servetool.errors import ServetoolError

# TorchServe's archiver accepts model names of this form; versions are ours (spec.VERSION_RE).
# \A...\Z, not ^...$: `$` also matches before a trailing newline, so "digits\n" would pass.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
VERSION_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
TOKEN_REFUSED = "Token Authorization failed"


def key_refused(status: int, body: str | bytes) -> bool:
    """Whether an answer refuses the key sent: TorchServe answers 400 "Token Authorization failed"
    to a missing, wrong or expired key; an authenticating front answers 401."""
    marker = TOKEN_REFUSED.encode() if isinstance(body, bytes) else TOKEN_REFUSED
    return status == 401 or (status == 400 and marker in body)


class APIError(ServetoolError):
    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def read_keys(key_file: Path, front_key_file: Path | None = None) -> dict[str, dict[str, Any]]:
    try:
        keys = json.loads(key_file.read_text())
    except (OSError, ValueError):
        keys = {}
    if front_key_file is not None:
        try:
            keys["management"] = json.loads(front_key_file.read_text())["management"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return keys


def check_name(name: str, what: str = "model name") -> str:
    """A model name as servetool accepts it anywhere (so `../ping` never becomes a path)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise APIError(f"{what} {name!r} is not valid: it must start with a letter or digit and "
                       "hold only letters, digits, '.', '_' and '-' (at most 128)")
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise APIError(f"version {version!r} is not valid: e.g. 1.0 or 2 (letters, digits, '.', "
                       "'_', '+', '-')")
    return version


def model_path(name: str, version: str | None = None, *, checked: bool = True) -> str:
    """/models/NAME[/VERSION], each segment percent-encoded. `checked=False` for names servetool
    only reads back from the server (another client may have registered an odd one)."""
    if checked:
        check_name(name)
        if version is not None:
            check_version(version)
    segments = [name] + ([version] if version else [])
    return "/" + "/".join(quote(seg, safe="") for seg in segments)


def _expiry(entry: dict[str, Any]) -> float | None:
    """When a key expires (seconds since the epoch), or None when its entry does not say."""
    stamp = entry.get("expiration time")
    if not stamp or not isinstance(stamp, str):
        return None
    try:
        # TorchServe writes e.g. "2026-11-22T03:40:35.123456789Z" (Python keeps the microseconds)
        from datetime import datetime

        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _expired(entry: dict[str, Any]) -> bool:
    when = _expiry(entry)
    return when is not None and when <= time.time()


class Client:
    def __init__(self, state: ServerState, timeout_s: float = 30.0,
                 keys: Callable[[], dict[str, dict[str, Any]]] | None = None,
                 keys_where: str | None = None) -> None:
        """`keys` reads the server's key_file.json (default: from state.key_file on this machine;
        the Docker target reads it inside the container)."""
        self.state = state
        self._keys = keys or (lambda: read_keys(state.key_file, state.front_key_file))
        self._keys_where = keys_where or str(state.key_file)
        self.timeout_s = timeout_s
        self._renewing = threading.Lock()  # one renewal at a time: a second would revoke the first
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
            with self._renewing:
                # another thread of this client may have renewed it while this one waited
                getattr(self._keys, "invalidate", lambda: None)()
                keys = self._keys()
                entry = keys.get(kind, entry)
                if _expired(entry) and "API" in keys:
                    self._renew(kind, keys["API"]["key"])
                    getattr(self._keys, "invalidate", lambda: None)()
                    entry = self._keys().get(kind, entry)
        return entry["key"]

    def key_expiry(self, kind: str) -> float | None:
        """When the current `kind` key expires (seconds since the epoch); None when token auth is
        off or the key file gives no expiry (a key that does not expire)."""
        if not self.state.token_auth:
            return None
        entry = self._keys().get(kind)
        return _expiry(entry) if isinstance(entry, dict) else None

    def _renew(self, kind: str, api_key: str) -> None:
        """Ask TorchServe for a new key (it revokes the old one); a failure is an error, not a
        silent fall back on a key that no longer works."""
        try:
            reply = self.session.get(f"{self.state.url('management')}/token", params={"type": kind},
                                     headers={"Authorization": f"Bearer {api_key}"},
                                     timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise APIError(f"renewing the expired {kind} key failed: {exc}") from None
        if reply.status_code != 200:
            raise APIError(f"renewing the expired {kind} key failed: TorchServe answered "
                           f"{reply.status_code}: {_message(reply)}", reply.status_code, reply.text)

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
            if key_refused(reply.status_code, reply.text) and self.state.token_auth:
                # the key expired between reading and arriving, or the server has new keys (a
                # restart): read the key file again, renew an expired key, and try once more
                getattr(self._keys, "invalidate", lambda: None)()
                headers = self._headers(kind, {**headers, "Authorization": ""})
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
        path = "/predictions" + model_path(model, version)
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

    def describe(self, name: str, version: str | None = "all",
                 unchecked: bool = False) -> list[dict[str, Any]]:
        """One entry per version ("all"), for one version, or for the default version (None)."""
        path = "/models" + model_path(name, version if version != "all" else None,
                                      checked=not unchecked)
        if version == "all":
            path += "/all"
        return self._call("GET", "management", path).json()

    def has_model(self, name: str) -> bool:
        return any(m["modelName"] == name for m in self.list_models())

    def register(self, archive_name: str, name: str, workers: int, timeout: float) -> dict[str, Any]:
        check_name(name)
        params = {"url": archive_name, "model_name": name, "initial_workers": workers,
                  "synchronous": "true"}
        return self._call("POST", "management", "/models", params=params, timeout=timeout).json()

    def unregister(self, name: str, version: str | None = None, timeout: float = 60) -> None:
        self._call("DELETE", "management", "/models" + model_path(name, version), timeout=timeout)

    def scale(self, name: str, min_workers: int, max_workers: int, version: str | None = None,
              timeout: float = 120) -> dict[str, Any]:
        path = "/models" + model_path(name, version)
        params = {"min_worker": min_workers, "max_worker": max_workers, "synchronous": "true"}
        return self._call("PUT", "management", path, params=params, timeout=timeout,
                          ok=(200, 202)).json()

    def set_default(self, name: str, version: str) -> None:
        self._call("PUT", "management", f"/models{model_path(name, version)}/set-default")

    def metrics(self) -> str:
        url = f"{self.state.url('metrics')}/metrics"
        return self.session.get(url, timeout=self.timeout_s).text




def explain_failure(status: int, message: str, body_size: int,
                    max_request_size: int | None = None) -> str:
    """What a failed prediction means, where TorchServe's own answer does not say (its 413 has an
    empty body; its 503 "has no worker" also means a full queue; "Worker died." has causes)."""
    if status == 413 and not message.strip():
        limit = max_request_size or DEFAULT_MAX_REQUEST_SIZE
        return (f"the request body ({body_size} bytes) is larger than the server's "
                f"max_request_size ({limit} bytes; TorchServe's default is "
                f"{DEFAULT_MAX_REQUEST_SIZE}, 6.5 MB): raise max_request_size (and "
                "max_response_size for large answers) in config.properties and deploy again")
    if status == 503 and "has no worker" in message:
        return (f"{message.strip()} -- TorchServe says this both when no worker is READY and when "
                "its job queue is full (job_queue_size, default 100): retry with a backoff, add "
                "workers (`servetool scale`), or raise job_queue_size")
    if status in (500, 507) and "Worker died" in message:
        return (f"{message.strip()} -- the worker serving this request exited (a crash in native "
                "code, out of memory, or longer than response_timeout); TorchServe starts a new "
                "one: retry, and read model_log.log for the cause")
    return message


def _message(reply: requests.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return reply.text.strip()[:300] or reply.reason
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:300]
    return str(body)[:300]
