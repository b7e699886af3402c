"""servetool's helper beside TorchServe: in the serving container (copied into the image as
servetool_pod.py) and on the local target (run as a file by servetool.torchserve).

Standard library only, so the image needs nothing of servetool itself. Subcommands:
  torchserve         start TorchServe in the foreground (the image's default command), with the
                     management front beside it when the management API is on a Unix socket
  front [HOST:PORT]  the management front (see below)
  exec COMMAND...    start the front (when management is on a Unix socket), then become COMMAND
  keys               print the keys a client of this server uses, as JSON (for `servetool token`)
  health             exit 0 when /ping answers Healthy (Docker HEALTHCHECK; token read in-container)
  ready              health, and every registered model has a READY worker
  scale NAME N       set NAME's workers through the management API on this container's server
  seed DIR           copy the image's archives into DIR (a pod's writable model store, which its
                     watcher adds versions to)
  watch              the pod's watcher (servetool/pod_watch.py, from servetool's code in lib/,
                     which images built for a watching deployment carry)
  gateway            the Kubernetes front door: checks the Bearer key every replica shares (from a
                     Secret) and forwards to this pod's TorchServe with the pod's own key

Why the gateway: TorchServe 0.12 generates new random keys at every start and cannot be given a key,
so N replicas behind one Service would each demand a different token. The gateway gives them one
key, keeps TorchServe's own token check on behind it (bound to 127.0.0.1), and answers token-free
liveness and readiness probes that report the real state of the server.

Why the management front: TorchServe registers a model from any directory on the machine given as
a plain path (`POST /models?url=/abs/dir`), whatever `allowed_urls` says; a handler there then runs
as the server's user. So TorchServe's management API listens on a Unix socket in a folder only the
server's user can enter, and the front, on the management port, is the only way in: it checks its
own key (TorchServe's management key never leaves the server's user, so its gRPC management API,
which cannot be turned off, is out of reach too), admits a registration only of an archive that is
a regular file in the model store, refuses handler overrides and workflows, and forwards the rest
with TorchServe's key.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

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
    props = parse_properties(path.read_text()) if path.is_file() else {}
    if props.get("enable_envvars_config", "false").lower() == "true":
        for key, value in os.environ.items():
            if key.startswith("TS_"):
                props[key[3:].lower()] = value
    _CONFIG_CACHE.clear()
    _CONFIG_CACHE[stamp] = props
    return props


def parse_properties(text: str) -> dict[str, str]:
    """A .properties file as java.util.Properties reads it (TorchServe's config): backslash escapes
    (a lone backslash disappears: `\\.` is read as `.`), continued lines, `=`, `:` or a space
    between key and value."""
    props: dict[str, str] = {}
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.lstrip()
        if not line or line[0] in "#!":
            continue
        while _continued(line):
            line = line[:-1] + next(lines, "").lstrip()
        key, rest = _split_key(line)
        props[_unescape(key)] = _unescape(rest)
    return props


def escape_property(value: str, key: bool = False) -> str:
    """The inverse of parse_properties for one key or value."""
    out = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if key:
        out = re.sub(r"([=: #!])", r"\\\1", out)
    elif out.startswith((" ", "\f")):
        out = "\\" + out
    return out


def format_properties(props: dict[str, str]) -> str:
    """Properties as lines java.util.Properties reads back unchanged."""
    return "".join(f"{escape_property(k, key=True)}={escape_property(v)}\n" for k, v in props.items())


def _continued(line: str) -> bool:
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def _split_key(line: str) -> tuple[str, str]:
    i = 0
    while i < len(line) and line[i] not in "=: \t\f":
        i += 2 if line[i] == "\\" else 1
    key, rest = line[:i], line[i:].lstrip(" \t\f")
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(" \t\f")
    return key, rest


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "\\" or i + 1 == len(text):
            out.append("" if ch == "\\" else ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2:i + 6]):
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
            continue
        out.append(_ESCAPES.get(nxt, nxt))
        i += 2
    return "".join(out)


def address(api: str, props: dict[str, str] | None = None) -> tuple[str, int]:
    """Where to reach an API from inside the container (a wildcard bind is reached on loopback);
    for a Unix socket (`unix:/path`), the socket's path and port 0."""
    props = props if props is not None else config()
    default = {"inference": "http://127.0.0.1:8080", "management": "http://127.0.0.1:8081",
               "metrics": "http://127.0.0.1:8082"}[api]
    configured = props.get(f"{api}_address", default)
    if configured.lower().startswith("unix:"):
        return configured[5:], 0
    url = urlsplit(configured)
    host = url.hostname or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return host, url.port or (443 if url.scheme == "https" else 80)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (TorchServe's management API behind the front)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def connect(api: str, timeout: float) -> http.client.HTTPConnection:
    host, port = address(api)
    if port == 0:
        return UnixHTTPConnection(host, timeout)
    return http.client.HTTPConnection(host, port, timeout=timeout)


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
                status, body = call("GET", "management", f"/token?type={kind}",
                                    key=keys["API"]["key"])
                if status != 200:
                    raise RuntimeError(f"renewing the expired {kind} key failed: TorchServe "
                                       f"answered {status} {body[:200].decode(errors='replace')}")
                entry = self.read().get(kind, entry)
            return entry["key"]


def _expired(entry: dict) -> bool:
    try:
        stamp = datetime.fromisoformat(entry["expiration time"].replace("Z", "+00:00"))
    except (KeyError, ValueError, AttributeError):
        return False
    # Renewing makes TorchServe revoke the old key at once, so a key is renewed only once it has
    # really expired: clients still using it keep working until then.
    return stamp.timestamp() <= time.time()


KEYS = Keys()


def call(method: str, api: str, path: str, body: bytes | None = None, key: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    kind = "inference" if api == "inference" else "management"
    key = key if key is not None else KEYS.get(kind)
    sent = dict(headers or {})
    if key:
        sent["Authorization"] = f"Bearer {key}"
    conn = connect(api, timeout)
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
            path = f"/models/{quote(model['modelName'], safe='')}"
            _, described = call("GET", "management", path, timeout=4)
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
    watching = os.environ.get("SERVETOOL_WATCH_STATE")
    if watching and not watcher_checked(Path(watching)):
        # a new pod serves what the source holds, not an older baked version
        return False, "the watcher has not finished its first check of the source yet"
    return True, f"ready: {found} model(s)"


def watcher_checked(state_file: Path) -> bool:
    """The pod's watcher has listed its source and acted on it at least once."""
    try:
        return bool(json.loads(state_file.read_text()).get("last_check"))
    except (OSError, ValueError, AttributeError):
        return False


def seed(dest: Path) -> int:
    """Copy the image's archives into a pod's writable model store; the number copied."""
    store = Path(config().get("model_store", "/home/model-server/model-store"))
    copied = 0
    for archive in sorted(store.glob("*.mar")):
        staged = dest / f".{archive.name}.partial"
        shutil.copyfile(archive, staged)
        os.replace(staged, dest / archive.name)
        copied += 1
    return copied


def scale(name: str, workers: int) -> tuple[bool, str]:
    if not MODEL_NAME.match(name):
        return False, f"model name {name!r} is not valid"
    path = f"/models/{quote(name, safe='')}?min_worker={workers}&max_worker={workers}&synchronous=true"
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
    # No --ncs: TorchServe keeps snapshots of its models, versions and workers in logs/config,
    # and a container restarted by its restart policy comes back with all of them.
    exec_with_front(["torchserve", "--start", "--foreground", "--model-store", store,
                     "--ts-config", with_last_snapshot(cfg), *extra])


def with_last_snapshot(cfg: str) -> str:
    """The config to start with: ours, plus the models of TorchServe's last snapshot when this
    container ran before. (TorchServe restores a snapshot by itself only when started without
    a config file; and its snapshot files escape `:` in a way its own launcher misreads.)"""
    snapshots = sorted((WORK / "logs" / "config").glob("*-snapshot.cfg"))
    models = parse_properties(snapshots[-1].read_text()).get("model_snapshot") if snapshots else None
    if not models:
        return cfg
    props = parse_properties(Path(cfg).read_text())
    props["model_snapshot"] = models
    restored = WORK / "restore.properties"
    restored.write_text(format_properties(props))
    return str(restored)


def exec_with_front(command: list[str]) -> None:
    """Start the management front (when TorchServe's management API is on a Unix socket), then
    become `command`. The front stays a child of the same process group, so whatever stops the
    group (tini -g in the image, `servetool stop` locally) stops both."""
    socket_path, port = address("management")
    if port == 0:  # TorchServe's own management socket: in a folder for this user only
        Path(socket_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        start_front()
    start_split()
    os.execvp(command[0], command)


def start_split() -> subprocess.Popen | None:
    """The canary split in front of the inference port, when the deployment has one: HAProxy
    and servetool's exporter beside it (servetool/split.py renders the config; split_runtime.py,
    in the image servetool_split.py, runs both)."""
    config = os.environ.get("SERVETOOL_SPLIT_CONFIG")
    text = os.environ.get("SERVETOOL_SPLIT_CONFIG_TEXT")
    if text:  # a container: the config comes in the environment, rendered for its paths
        config = str(WORK / "haproxy.cfg")
        Path(config).write_text(text)
    if not config:
        return None
    runtime = os.environ.get("SERVETOOL_SPLIT_RUNTIME", "/opt/servetool/servetool_split.py")
    weights = os.environ.get("SERVETOOL_SPLIT_WEIGHTS")
    return subprocess.Popen([sys.executable, runtime, "serve", str(WORK), config,
                             os.environ.get("SERVETOOL_SPLIT_EXPORTER_PORT", "8088"),
                             *([weights] if weights else [])], stdin=subprocess.DEVNULL)


def relay(handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]],
          data: bytes) -> None:
    """Send TorchServe's answer on to the client, less the hop-by-hop headers."""
    handler.send_response(status)
    for k, v in headers:
        if k.lower() not in HOP_BY_HOP:
            handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


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
        relay(self, status, reply_headers, data)

    def _upstream(self, method: str, path: str, body: bytes, headers: dict[str, str]):
        for attempt in (1, 2):  # a kept-alive connection the server closed is retried once
            conn = getattr(self.local, "conn", None)
            if conn is None:
                host, port = gateway_upstream()
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


def gateway_upstream() -> tuple[str, int]:
    """Where the gateway forwards: TorchServe's inference API, or the canary split in front of it
    (SERVETOOL_GATEWAY_UPSTREAM, HOST:PORT) when the pod has one."""
    configured = os.environ.get("SERVETOOL_GATEWAY_UPSTREAM")
    if configured:
        host, _, port = configured.rpartition(":")
        return host, int(port)
    return address("inference")


def run_gateway() -> None:
    listen = os.environ.get("SERVETOOL_GATEWAY_LISTEN", "0.0.0.0:8080")
    host, _, port = listen.rpartition(":")
    if not gateway_keys():
        print(f"gateway: no keys in {os.environ.get('SERVETOOL_GATEWAY_KEYS', '/etc/servetool/keys')}"
              " (mount the servetool Secret there)", file=sys.stderr)
        sys.exit(2)
    server = ThreadingHTTPServer((host, int(port)), Gateway)
    server.daemon_threads = True
    print(f"gateway: listening on {listen}, forwarding to {gateway_upstream()}", file=sys.stderr)
    server.serve_forever()


# --- the management front -------------------------------------------------------------------------
FRONT_KEY_FILE = "front_key.json"
# The registration parameters servetool uses; `handler`, `runtime` and the like would let a caller
# choose code the archive does not hold.
REGISTER_PARAMS = {"url", "model_name", "initial_workers", "synchronous", "batch_size",
                   "max_batch_delay", "response_timeout", "startup_timeout"}
INTEGER_PARAMS = {"initial_workers", "batch_size", "max_batch_delay", "response_timeout",
                  "startup_timeout"}
ARCHIVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.mar$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_MANAGEMENT_BODY = 1 << 16


def front_key(path: Path) -> str:
    """The front's key, created (readable by this user only) the first time it is asked for; it
    outlives server restarts, unlike TorchServe's own keys."""
    try:
        return json.loads(path.read_text())["management"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    record = json.dumps({"management": {"key": key, "created": datetime.now().isoformat()}})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(record + "\n")
    return key


def registration_problem(query: dict[str, list[str]], store: Path) -> str | None:
    """Why a `POST /models` must be refused, or None: only an archive that is a regular file in the
    model store, named by its file name, may be registered."""
    unknown = sorted(set(query) - REGISTER_PARAMS)
    if unknown:
        return (f"parameter(s) {', '.join(unknown)} are not accepted; servetool registers archives "
                f"as they were packaged (allowed: {', '.join(sorted(REGISTER_PARAMS))})")
    repeated = sorted(k for k, v in query.items() if len(v) != 1)
    if repeated or "url" not in query:
        return "give url (the file name of an archive in the model store) and each parameter once"
    url = query["url"][0]
    if not ARCHIVE_NAME.match(url) or ".." in url:
        return (f"url {url!r} is not the file name of an archive in the model store (NAME.mar, no "
                f"path, scheme or '..'): models are loaded only from the model store")
    try:
        info = os.lstat(store / url)
    except OSError:
        return f"no archive {url} in the model store"
    if not stat.S_ISREG(info.st_mode):
        return f"{url} in the model store is not a regular file (links are refused)"
    name = query.get("model_name", ["x"])[0]
    if not MODEL_NAME.match(name):
        return (f"model_name {name!r} must start with a letter or digit and hold only letters, "
                "digits, '.', '_' and '-' (at most 128)")
    bad = [k for k in INTEGER_PARAMS & set(query) if not re.fullmatch(r"\d{1,7}", query[k][0])]
    if bad or query.get("synchronous", ["true"])[0] not in ("true", "false"):
        return f"{', '.join(sorted(bad)) or 'synchronous'}: not a valid value"
    return None


def canonical_target(target: str) -> tuple[list[str], dict[str, list[str]], str]:
    """The request target as TorchServe will read it (path segments percent-decoded once, as its
    QueryStringDecoder does), and the one target the front forwards, rebuilt from those very
    values: what the front checks is exactly what TorchServe receives."""
    if ";" in target:  # Netty splits queries at ';' too, Python does not: refuse the ambiguity
        raise ValueError("';' is not accepted in management requests")
    parts = urlsplit(target)
    segments = [unquote(seg) for seg in parts.path.split("/")]
    while len(segments) > 1 and segments[-1] == "":  # Java's split drops trailing empty strings
        segments.pop()
    query = parse_qs(parts.query, keep_blank_values=True)
    path = "/".join(quote(seg, safe="") for seg in segments) or "/"
    rebuilt = path + (f"?{urlencode(query, doseq=True, quote_via=quote)}" if query else "")
    return segments, query, rebuilt


class ManagementFront(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "servetool-management"
    disable_nagle_algorithm = True
    key_path: Path = WORK / FRONT_KEY_FILE

    def log_message(self, fmt: str, *args) -> None:
        pass

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps({**payload, "status": status}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        if not token_auth():
            return True
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), front_key(self.key_path).encode())

    def _refusal(self, segments: list[str], query: dict[str, list[str]],
                 body: bytes) -> tuple[int, str] | None:
        resource = segments[1] if len(segments) > 1 else ""
        if resource == "workflows":
            return 403, "workflows are not served through servetool (they can load code from " \
                        "outside the model store)"
        if self.command == "POST" and resource == "models" and len(segments) == 2:
            if body.strip():
                return 400, "send the registration parameters in the query string, not the body"
            store = Path(config().get("model_store", "/home/model-server/model-store"))
            problem = registration_problem(query, store)
            if problem:
                return 403, problem
        return None

    def _forward(self) -> None:
        try:
            segments, query, target = canonical_target(self.path)
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as exc:
            self.close_connection = True
            self._json(400, {"error": f"bad request: {exc}"})
            return
        # Renewing one of TorchServe's keys needs TorchServe's API key, which only the server's
        # user can read: such a request goes through with the caller's own credentials.
        renewal = segments[1:] == ["token"]
        if not renewal and not self._authorized():
            self._json(401, {"error": "missing or wrong management key: send 'Authorization: "
                                      "Bearer KEY' with the key `servetool token --kind management` "
                                      "prints"})
            return
        if length > MAX_MANAGEMENT_BODY or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._json(413, {"error": f"management requests carry at most {MAX_MANAGEMENT_BODY} "
                                      "bytes, with a Content-Length"})
            return
        body = self.rfile.read(length) if length else b""
        refusal = self._refusal(segments, query, body)
        if refusal:
            self._json(refusal[0], {"error": refusal[1]})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            key = self.headers.get("Authorization", "")[7:] if renewal else KEYS.get("management")
            if key:
                headers["Authorization"] = f"Bearer {key}"
            conn = connect("management", timeout=600)
            try:
                conn.request(self.command, target, body=body or None, headers=headers)
                reply = conn.getresponse()
                status, reply_headers, data = reply.status, reply.getheaders(), reply.read()
            finally:
                conn.close()
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            self._json(503, {"error": f"TorchServe's management API is not answering: {exc}"})
            return
        relay(self, status, reply_headers, data)

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = _forward


def run_front(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    front_key(ManagementFront.key_path)
    server_class = type("FrontServer", (ThreadingHTTPServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
        "daemon_threads": True})
    server = server_class((host, int(port)), ManagementFront)
    print(f"front: listening on {listen}, forwarding to {address('management')[0]}",
          file=sys.stderr, flush=True)
    server.serve_forever()


def start_front() -> subprocess.Popen | None:
    """The front beside TorchServe, when its management API is on a Unix socket."""
    if address("management")[1] != 0:
        return None
    listen = os.environ.get("SERVETOOL_FRONT_LISTEN", "0.0.0.0:8081")
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "front", listen],
                            stdin=subprocess.DEVNULL)


def client_keys() -> dict:
    """What a client of this server uses: TorchServe's inference and API keys, the front's key for
    management."""
    keys = dict(KEYS.read())
    if address("management")[1] == 0:
        keys["management"] = {"key": front_key(ManagementFront.key_path)}
    return keys


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "torchserve"
    if command == "torchserve":
        run_torchserve(argv[1:])
        return 0
    if command == "gateway":
        run_gateway()
        return 0
    if command == "front":
        run_front(argv[1] if len(argv) > 1 else os.environ.get("SERVETOOL_FRONT_LISTEN",
                                                               "127.0.0.1:8081"))
        return 0
    if command == "exec" and len(argv) > 1:
        exec_with_front(argv[1:])
        return 0
    if command == "keys":
        print(json.dumps(client_keys()))
        return 0
    if command in ("health", "ready"):
        ok, detail = health() if command == "health" else ready()
        print(detail)
        return 0 if ok else 1
    if command == "seed" and len(argv) == 2:
        print(f"copied {seed(Path(argv[1]))} archive(s) into {argv[1]}")
        return 0
    if command == "watch":
        lib = str(Path(__file__).resolve().parent / "lib")
        env = {**os.environ, "PYTHONPATH": lib, "SERVETOOL_POD_HELPER": os.path.abspath(__file__)}
        os.execve(sys.executable, [sys.executable, "-m", "servetool.pod_watch"], env)
    if command == "scale" and len(argv) == 3 and argv[2].isdigit():
        ok, detail = scale(argv[1], int(argv[2]))
        print(detail)
        return 0 if ok else 1
    print("usage: servetool_pod.py torchserve|gateway|front [HOST:PORT]|exec COMMAND...|keys|"
          "health|ready|scale NAME WORKERS|seed DIR|watch", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
