"""servetool's helper inside the serving container (copied into the image as servetool_pod.py).

Standard library only, so the image needs nothing of servetool itself. Subcommands:
  torchserve         start TorchServe in the foreground (the image's default command)
  health             exit 0 when /ping answers Healthy (Docker HEALTHCHECK; token read in-container)
  ready              health, and every registered model has a READY worker
  scale NAME N       set NAME's workers through the management API on this container's server
  gateway            the Kubernetes front door: checks the Bearer key every replica shares (from a
                     Secret) and forwards to this pod's TorchServe with the pod's own key

Why the gateway: TorchServe 0.12 generates new random keys at every start and cannot be given a key,
so N replicas behind one Service would each demand a different token. The gateway gives them one
key, keeps TorchServe's own token check on behind it (bound to 127.0.0.1), and answers token-free
liveness and readiness probes that report the real state of the server.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

WORK = Path(os.environ.get("SERVETOOL_WORK_DIR", "/home/model-server/work"))
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "authorization", "host", "content-length",
              "expect"}


_CONFIG_CACHE: dict[tuple[str, int], dict[str, str]] = {}


def config() -> dict[str, str]:
    """config.properties with TorchServe's own TS_* environment overrides applied over it; parsed
    again only when the file changes (the gateway asks on every request)."""
    path = Path(os.environ.get("SERVETOOL_TS_CONFIG", "/opt/servetool/config.properties"))
    try:
        stamp = (str(path), path.stat().st_mtime_ns)
    except OSError:
        stamp = (str(path), -1)
    if stamp in _CONFIG_CACHE:
        return _CONFIG_CACHE[stamp]
    props: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "!")) and "=" in line:
                key, value = line.split("=", 1)
                props[key.strip()] = value.strip()
    if props.get("enable_envvars_config", "false").lower() == "true":
        for key, value in os.environ.items():
            if key.startswith("TS_"):
                props[key[3:].lower()] = value
    _CONFIG_CACHE.clear()
    _CONFIG_CACHE[stamp] = props
    return props


def address(api: str, props: dict[str, str] | None = None) -> tuple[str, int]:
    """Where to reach an API from inside the container (a wildcard bind is reached on loopback)."""
    props = props if props is not None else config()
    default = {"inference": "http://127.0.0.1:8080", "management": "http://127.0.0.1:8081",
               "metrics": "http://127.0.0.1:8082"}[api]
    url = urlsplit(props.get(f"{api}_address", default))
    host = url.hostname or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return host, url.port or (443 if url.scheme == "https" else 80)


def token_auth(props: dict[str, str] | None = None) -> bool:
    props = props if props is not None else config()
    return props.get("disable_token_authorization", "false").lower() != "true"


class Keys:
    """This server's own keys (key_file.json in its working directory), renewed when they expire."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or WORK / "key_file.json"
        self.lock = threading.Lock()
        self.cached: tuple[float, dict] = (-1.0, {})

    def read(self) -> dict:
        """The file's keys, parsed again only when it changed: TorchServe rewrites it when a key is
        renewed or the server restarts (new keys), and the gateway must follow without a restart."""
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime != self.cached[0]:
                self.cached = (mtime, json.loads(self.path.read_text()))
            return self.cached[1]
        except (OSError, ValueError):
            return {}

    def get(self, kind: str) -> str | None:
        if not token_auth():
            return None
        with self.lock:
            keys = self.read()
            entry = keys.get(kind)
            if entry is None:
                raise RuntimeError(f"no {kind} key in {self.path} yet")
            if _expired(entry) and "API" in keys:
                call("GET", "management", f"/token?type={kind}", key=keys["API"]["key"])
                entry = self.read().get(kind, entry)
            return entry["key"]


def _expired(entry: dict) -> bool:
    try:
        stamp = datetime.fromisoformat(entry["expiration time"].replace("Z", "+00:00"))
    except (KeyError, ValueError, AttributeError):
        return False
    return stamp.timestamp() - 30 < time.time()


KEYS = Keys()


def call(method: str, api: str, path: str, body: bytes | None = None, key: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    host, port = address(api)
    kind = "inference" if api == "inference" else "management"
    key = key if key is not None else KEYS.get(kind)
    sent = dict(headers or {})
    if key:
        sent["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=sent)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def health() -> tuple[bool, str]:
    try:
        status, body = call("GET", "inference", "/ping", timeout=4)
    except (OSError, RuntimeError) as exc:
        return False, f"ping failed: {exc}"
    healthy = status == 200 and json.loads(body or b"{}").get("status") == "Healthy"
    return healthy, f"/ping {status}: {body.decode(errors='replace').strip()}"


def ready() -> tuple[bool, str]:
    """Healthy, and each model's default version has a READY worker (startup models included)."""
    ok, detail = health()
    if not ok:
        return ok, detail
    try:
        status, body = call("GET", "management", "/models?limit=1000", timeout=4)
        if status != 200:
            return False, f"/models {status}"
        missing = []
        for model in json.loads(body).get("models", []):
            _, described = call("GET", "management", f"/models/{model['modelName']}", timeout=4)
            workers = json.loads(described)[0].get("workers", [])
            if not any(w.get("status") == "READY" for w in workers):
                missing.append(model["modelName"])
    except (OSError, RuntimeError, ValueError) as exc:
        return False, f"management API: {exc}"
    expected = len(json.loads(config().get("models") or "{}"))  # the startup models, if any
    found = len(json.loads(body).get("models", []))
    if found < expected:
        return False, f"{found} of {expected} models loaded"
    if missing:
        return False, "no READY worker yet: " + ", ".join(missing)
    return True, f"ready: {found} model(s)"


def scale(name: str, workers: int) -> tuple[bool, str]:
    path = f"/models/{name}?min_worker={workers}&max_worker={workers}&synchronous=true"
    status, body = call("PUT", "management", path, timeout=300)
    return status in (200, 202), body.decode(errors="replace").strip()


def run_torchserve(extra: list[str]) -> None:
    for sub in ("logs", "tmp"):
        (WORK / sub).mkdir(parents=True, exist_ok=True)
    (WORK / "key_file.json").unlink(missing_ok=True)
    props = config()
    store = props.get("model_store", "/home/model-server/model-store")
    cfg = os.environ.get("SERVETOOL_TS_CONFIG", "/opt/servetool/config.properties")
    os.chdir(WORK)
    os.execvp("torchserve", ["torchserve", "--start", "--foreground", "--ncs",
                             "--model-store", store, "--ts-config", cfg, *extra])


# --- the gateway ----------------------------------------------------------------------------------
def gateway_keys() -> list[str]:
    """The keys clients may present: every non-empty file in SERVETOOL_GATEWAY_KEYS (a Secret mount),
    so a key can be rotated by adding the new one before removing the old."""
    folder = Path(os.environ.get("SERVETOOL_GATEWAY_KEYS", "/etc/servetool/keys"))
    keys = []
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if path.is_file() and not path.name.startswith("."):
            text = path.read_text().strip()
            if text:
                keys.append(text)
    return keys


class Gateway(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "servetool-gateway"
    # Headers and body go out in two writes: with Nagle on, the body waits for the client's
    # delayed ACK (40 ms on Linux) on every kept-alive request.
    disable_nagle_algorithm = True
    local = threading.local()
    ready_cache: tuple[float, bool, str] = (0.0, False, "not checked yet")
    keys_cache: tuple[float, list[str]] = (0.0, [])

    def log_message(self, fmt: str, *args) -> None:  # no per-request log line
        pass

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="servetool"')
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        """The request body, refused (ValueError) past TorchServe's own max_request_size, so that
        no client can make the gateway buffer more than the server would accept."""
        limit = int(config().get("max_request_size", "6553500"))
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise ValueError(f"the body is larger than max_request_size ({limit} bytes)")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise ValueError(f"the body is larger than max_request_size ({limit} bytes)")
        return self.rfile.read(length)

    @classmethod
    def allowed(cls) -> list[str]:
        stamp, keys = cls.keys_cache
        if time.monotonic() - stamp > 5:  # a rotated Secret reaches the mount within a minute
            keys = gateway_keys()
            cls.keys_cache = (time.monotonic(), keys)
        return keys

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        return any(hmac.compare_digest(token.encode(), k.encode()) for k in self.allowed())

    def _probe(self) -> bool:
        path = self.path.split("?")[0]
        if path == "/healthz":
            self._json(200, {"status": "alive"})
            return True
        if path == "/readyz":
            stamp, ok, detail = Gateway.ready_cache
            if time.monotonic() - stamp > 1:
                ok, detail = ready()
                Gateway.ready_cache = (time.monotonic(), ok, detail)
            self._json(200 if ok else 503, {"status": "ready" if ok else "not ready", "detail": detail})
            return True
        return False

    def _forward(self) -> None:
        if self._probe():
            return
        if not self._authorized():
            self._json(401, {"error": "missing or wrong API key: send 'Authorization: Bearer KEY' "
                                      "with the key from the servetool Secret", "status": 401})
            return
        try:
            body = self._body()
        except ValueError as exc:
            self.close_connection = True  # the rest of the body is never read
            status = 413 if "max_request_size" in str(exc) else 400
            self._json(status, {"error": f"bad request body: {exc}", "status": status})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            key = KEYS.get("inference")
            if key:
                headers["Authorization"] = f"Bearer {key}"
            status, reply_headers, data = self._upstream(self.command, self.path, body, headers)
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            self._json(503, {"error": f"TorchServe in this pod is not answering: {exc}", "status": 503})
            return
        self.send_response(status)
        for k, v in reply_headers:
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _upstream(self, method: str, path: str, body: bytes, headers: dict[str, str]):
        for attempt in (1, 2):  # a kept-alive connection the server closed is retried once
            conn = getattr(self.local, "conn", None)
            if conn is None:
                host, port = address("inference")
                conn = self.local.conn = http.client.HTTPConnection(host, port, timeout=300)
            try:
                conn.request(method, path, body=body, headers=headers)
                reply = conn.getresponse()
                return reply.status, reply.getheaders(), reply.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        raise RuntimeError("unreachable")

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = _forward


def run_gateway() -> None:
    listen = os.environ.get("SERVETOOL_GATEWAY_LISTEN", "0.0.0.0:8080")
    host, _, port = listen.rpartition(":")
    if not gateway_keys():
        print(f"gateway: no keys in {os.environ.get('SERVETOOL_GATEWAY_KEYS', '/etc/servetool/keys')}"
              " (mount the servetool Secret there)", file=sys.stderr)
        sys.exit(2)
    server = ThreadingHTTPServer((host, int(port)), Gateway)
    server.daemon_threads = True
    print(f"gateway: listening on {listen}, forwarding to {address('inference')}", file=sys.stderr)
    server.serve_forever()


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "torchserve"
    if command == "torchserve":
        run_torchserve(argv[1:])
        return 0
    if command == "gateway":
        run_gateway()
        return 0
    if command in ("health", "ready"):
        ok, detail = health() if command == "health" else ready()
        print(detail)
        return 0 if ok else 1
    if command == "scale" and len(argv) == 3 and argv[2].isdigit():
        ok, detail = scale(argv[1], int(argv[2]))
        print(detail)
        return 0 if ok else 1
    print("usage: servetool_pod.py torchserve|gateway|health|ready|scale NAME WORKERS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
