"""servetool's helper beside TorchServe: in the serving container (copied into the image as
servetool_pod.py) and on the local target (run as a file by servetool.engines.torchserve.process).

Standard library only, but for the HTTP server under the front and the gateway (uvicorn with httptools,
imported when they start), so the image needs nothing of servetool itself. Subcommands:
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
  watch              the pod's watcher (servetool/operate/pod_watch.py, from servetool's code in lib/,
                     which images built for a watching deployment carry)
  gateway            the Kubernetes front door: checks the Bearer key every replica shares (from a
                     Secret) and forwards to this pod's TorchServe with the pod's own key
  keep NAME DIR -- COMMAND...
                     run COMMAND, again whenever it dies (the front, the split, the watcher and
                     the crash supervisor run under one), keeping DIR/supervised-NAME.json

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
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

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
    """Start the management front (when TorchServe's management API is on a Unix socket) and the
    canary split, each under a keeper that starts it again when it dies, then become `command`.
    The keepers stay children of the same process group, so whatever stops the group (tini -g in
    the image, `servetool stop` locally) stops them and what they keep."""
    socket_path, port = address("management")
    if port == 0:  # TorchServe's own management socket: in a folder for this user only
        Path(socket_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        start_front()
    start_split()
    start_clients()
    os.execvp(command[0], command)


def start_clients() -> subprocess.Popen | None:
    """The OpenAI/TEI clients' front (servetool/engines/torchserve/clients.py, local target only: it needs
    servetool itself), under a keeper, when SERVETOOL_CLIENTS_LISTEN asks for it."""
    listen = os.environ.get("SERVETOOL_CLIENTS_LISTEN")
    if not listen:
        return None
    return start_kept("clients", [sys.executable, "-m", "servetool.engines.torchserve.clients", listen])


def start_split() -> subprocess.Popen | None:
    """The canary split in front of the inference port, when the deployment has one: HAProxy
    and servetool's exporter beside it (servetool/engines/torchserve/split.py renders the config;
    split_runtime.py, in the image servetool_split.py, runs both), under a keeper."""
    config = os.environ.get("SERVETOOL_SPLIT_CONFIG")
    text = os.environ.get("SERVETOOL_SPLIT_CONFIG_TEXT")
    if text:  # a container: the config comes in the environment, rendered for its paths
        config = str(WORK / "haproxy.cfg")
        Path(config).write_text(text)
    if not config:
        return None
    runtime = os.environ.get("SERVETOOL_SPLIT_RUNTIME", "/opt/servetool/servetool_split.py")
    weights = os.environ.get("SERVETOOL_SPLIT_WEIGHTS")
    return start_kept("split", [sys.executable, runtime, "serve", str(WORK), config,
                                os.environ.get("SERVETOOL_SPLIT_EXPORTER_PORT", "8088"),
                                *([weights] if weights else [])])


# --- supervision of the helpers -------------------------------------------------------------------
# A helper that dies (killed, out of memory, a bug) comes back like TorchServe's own workers do;
# what happened is kept in STATE_DIR/supervised-NAME.json for `servetool status`.
KEEP_BACKOFF_S = (0.2, 30.0)  # first wait, longest wait between restarts
KEEP_STABLE_S = 30.0  # a helper that ran this long starts again at once after its next exit


def start_kept(name: str, command: list[str], state_dir: Path | None = None,
               **popen: object) -> subprocess.Popen:
    """`command` under a keeper (this file's `keep` subcommand)."""
    keeper = [sys.executable, os.path.abspath(__file__), "keep", name, str(state_dir or WORK),
              "--", *command]
    return subprocess.Popen(keeper, stdin=subprocess.DEVNULL, **popen)


def supervised_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"supervised-{name}.json"


def read_supervised(state_dir: Path) -> dict[str, dict]:
    """What the keepers of a run folder recorded: per helper its restarts and last exit."""
    found = {}
    for path in sorted(state_dir.glob("supervised-*.json")):
        try:
            found[path.stem.removeprefix("supervised-")] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


def write_private(path: Path, text: str) -> None:
    """Replace a file atomically, readable by this user only."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(staged, path)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def keep(name: str, state_dir: Path, command: list[str]) -> int:
    """Run `command`, and again each time it fails (a non-zero exit or a signal), until it ends
    with 0 or this keeper is told to stop (SIGTERM, SIGINT, SIGHUP, which it passes on). Restarts
    back off while the helper keeps failing."""
    stopping = False
    child: subprocess.Popen | None = None

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    record = {"name": name, "command": command[-3:], "restarts": 0, "crashes": []}
    wait = KEEP_BACKOFF_S[0]
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        record.update(pid=child.pid, started=datetime.now().astimezone().isoformat(timespec="seconds"))
        write_private(supervised_file(state_dir, name), json.dumps(record))
        code = child.wait()
        if stopping or code == 0:  # told to stop, or it ended by itself on purpose
            break
        reason = _exit_reason(code)
        record["restarts"] += 1
        record["crashes"] = [*record["crashes"][-9:], {
            "at": datetime.now().astimezone().isoformat(timespec="seconds"), "reason": reason}]
        wait = KEEP_BACKOFF_S[0] if time.monotonic() - started > KEEP_STABLE_S else \
            min(KEEP_BACKOFF_S[1], wait * 2)
        print(f"servetool keep: {name} {reason}; starting it again in {wait:.1f} s",
              file=sys.stderr, flush=True)
        write_private(supervised_file(state_dir, name), json.dumps(record))
        deadline = time.monotonic() + wait
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


# --- HTTP under the front and the gateway ---------------------------------------------------------
# uvicorn on uvloop with httptools (llhttp, Node.js's HTTP/1.1 parser, strict by default): a
# negative, malformed, repeated or conflicting Content-Length, Content-Length beside
# Transfer-Encoding, or a Transfer-Encoding that does not end in chunked is answered 400 and the
# connection closed before any application code runs. Why not h11: as strict, but pure Python, and
# the gateway is on every prediction's path (benchmarks/gateway.py: 0.70 of the old http.server
# gateway on digits with h11, 0.95 with httptools). What the parser leaves to servetool is done
# here: a limit on the head's size, a body limit before buffering, deadlines for a request's head
# and body, and a connection closed after any answer given before its body was read (so no unread
# bytes are read as a next request).
MAX_HEAD_BYTES = 16 * 1024
SERVER_FRONT, SERVER_GATEWAY = "servetool-management", "servetool-gateway"  # realms too
HEAD_TIMEOUT_S = float(os.environ.get("SERVETOOL_HEAD_TIMEOUT_S", "10"))
BODY_TIMEOUT_S = float(os.environ.get("SERVETOOL_BODY_TIMEOUT_S", "30"))
KEEP_ALIVE_S = 5


class Refusal(Exception):
    """An answer given by servetool itself, with the connection closed when `close`."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


def _strict_protocol():
    """uvicorn's httptools protocol (llhttp, Node.js's parser) with two limits it lacks: the
    request head's size (MAX_HEAD_BYTES, then 400 and close) and a deadline for each request's
    head (a client that sends its headers a byte at a time holds no connection longer than
    HEAD_TIMEOUT_S)."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class StrictHttpTools(HttpToolsProtocol):
        head_timer = None
        head_bytes = 0
        in_head = True

        def _arm(self) -> None:
            self._disarm()
            self.in_head, self.head_bytes = True, 0
            self.head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_late)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_late(self) -> None:
            if self.in_head and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count(self, n: int) -> None:
            self.head_bytes += n
            if self.head_bytes > MAX_HEAD_BYTES:
                raise httptools.HttpParserError("request head too large")  # uvicorn: 400, close

        def on_headers_complete(self) -> None:
            self.in_head = False
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return StrictHttpTools


def serve_asgi(app, host: str, port: int, name: str) -> None:
    """Serve `app` on HOST:PORT until SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, http=_strict_protocol(), loop="uvloop", lifespan="off",
                            access_log=False, log_level="warning", server_header=False,
                            date_header=False, timeout_keep_alive=KEEP_ALIVE_S,
                            backlog=256,
                            limit_concurrency=256)
    print(f"{name}: listening on {host}:{port}", file=sys.stderr, flush=True)
    uvicorn.Server(config).run()


def request_headers(scope: dict) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]


def header(scope: dict, name: str) -> str | None:
    values = [v for k, v in request_headers(scope) if k == name]
    if len(values) > 1:
        raise Refusal(400, f"the {name} header is given {len(values)} times", close=True)
    return values[0] if values else None


def bearer(scope: dict) -> str:
    given = header(scope, "authorization") or ""
    return given[7:].strip() if given[:7].lower() == "bearer " else ""


async def read_body(scope: dict, receive, limit: int, limit_name: str = "the limit here") -> bytes:
    """The request body, refused (413, connection closed) past `limit` bytes before more than that
    is buffered, and (408) when it does not arrive within BODY_TIMEOUT_S."""
    import asyncio

    too_large = f"the body is larger than {limit_name} ({limit} bytes)"

    length = header(scope, "content-length")
    chunked = header(scope, "transfer-encoding") is not None
    if length is not None and chunked:  # (llhttp refuses it first; kept for any other parser)
        raise Refusal(400, "Content-Length together with Transfer-Encoding is refused", close=True)
    if length is not None and int(length) > limit:  # the parser has checked it is digits
        raise Refusal(413, too_large, close=True)
    chunks, total = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
        except TimeoutError:
            raise Refusal(408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                          close=True) from None
        if message["type"] == "http.disconnect":
            raise Refusal(400, "the client went away", close=True)
        data = message.get("body", b"")
        total += len(data)
        if total > limit:
            raise Refusal(413, too_large, close=True)
        chunks.append(data)
        if not message.get("more_body"):
            return b"".join(chunks)


async def send_reply(send, status: int, headers: list[tuple[str, str]], body: bytes,
                     close: bool = False, server: str = "servetool") -> None:
    out = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers
           if k.lower() not in HOP_BY_HOP and k.lower() != "server"]
    out.append((b"server", server.encode()))
    out.append((b"content-length", str(len(body)).encode()))
    if close:
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def send_json(send, status: int, payload: dict, close: bool = False,
                    server: str = "servetool") -> None:
    headers = [("Content-Type", "application/json")]
    if status == 401:
        headers.append(("WWW-Authenticate", f'Bearer realm="{server}"'))
    await send_reply(send, status, headers, json.dumps({**payload, "status": status}).encode(),
                     close, server)


class App:
    """An ASGI app of servetool's: `handle` answers a request or raises Refusal."""

    server = "servetool"

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self.handle(scope, receive, send)
        except Refusal as refusal:
            await send_json(send, refusal.status, {"error": str(refusal)}, refusal.close,
                            self.server)

    async def handle(self, scope: dict, receive, send) -> None:
        raise NotImplementedError


def forwarded_headers(scope: dict) -> dict[str, str]:
    return {k: v for k, v in request_headers(scope) if k not in HOP_BY_HOP}


# --- one canonical form of a request target -------------------------------------------------------
# TorchServe reads a target with Netty's QueryStringDecoder: the path percent-decoded once and split
# at '/', parameters split at '&' and ';' and decoded once with '+' as a space. The front decides
# on the values that decoding gives and forwards a target rebuilt from them (every byte outside
# the unreserved set encoded), so what it checks is exactly what TorchServe acts on. Whatever one
# decoder could read differently from another is refused outright rather than interpreted.
MAX_TARGET = 4096
MAX_PARAMS = 32
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HEX_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    segments: list[str]  # as TorchServe's `path.split("/")`: "" first, no trailing empty ones
    params: dict[str, str]  # each name once
    rebuilt: str  # what is forwarded

    @property
    def query(self) -> dict[str, list[str]]:
        return {k: [v] for k, v in self.params.items()}


def _decode(raw: str, what: str, query: bool) -> str:
    """One percent-decoding of one path segment (query=False) or one parameter name or value
    (query=True, where '+' is a space), checked for what a second decoder could read otherwise."""
    if _ESCAPE.search(raw):
        raise TargetError(f"{what}: '%' that does not start an escape (%XX)")
    try:
        text = unquote(raw.replace("+", " ") if query else raw, errors="strict")
    except UnicodeDecodeError:
        raise TargetError(f"{what}: escapes that are not UTF-8 (an overlong or broken "
                          "sequence)") from None
    # TorchServe decodes the path before it splits it at '/', so an encoded '/' in a segment would
    # move the segment boundaries; a parameter is split first and decoded after, so it may hold one.
    for escape in [] if query else _HEX_ESCAPE.findall(raw):
        if escape.lower() in ("%2f", "%5c"):
            raise TargetError(f"{what}: an encoded '/' or '\\' ({escape})")
    if "%" in text:
        raise TargetError(f"{what}: an encoded '%' (the target would decode a second time to "
                          "something else)")
    if "\\" in text:
        raise TargetError(f"{what}: a '\\'")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        raise TargetError(f"{what}: a control or invisible format character ({bad[0]!r})")
    return text


def canonical_target(target: str) -> Target:
    """The request target decoded once and checked, or TargetError naming what is refused."""
    if len(target) > MAX_TARGET:
        raise TargetError(f"the target is longer than {MAX_TARGET} characters")
    if any(not 0x21 <= ord(c) <= 0x7E for c in target):
        raise TargetError("the target holds a byte that is not printable ASCII")
    if not target.startswith("/"):
        raise TargetError("the target must be a path starting with '/' (no absolute form)")
    if "#" in target or ";" in target:
        raise TargetError("'#' and ';' are not accepted in a target (decoders split at them "
                          "differently)")
    raw_path, _, raw_query = target.partition("?")
    pieces = raw_path.split("/")
    while pieces and pieces[-1] == "":  # Java's split drops trailing empty strings
        pieces.pop()
    segments = [""] if pieces else []
    for i, raw in enumerate(pieces[1:], 1):
        segment = _decode(raw, f"path segment {i}", query=False)
        if segment in ("", ".", ".."):
            raise TargetError(f"path segment {i}: an empty, '.' or '..' segment")
        segments.append(segment)
    params: dict[str, str] = {}
    for i, raw in enumerate(raw_query.split("&") if raw_query else [], 1):
        raw_name, eq, raw_value = raw.partition("=")
        name = _decode(raw_name, f"parameter {i}'s name", query=True)
        value = _decode(raw_value, f"parameter {name!r}", query=True)
        if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise TargetError(f"parameter {i}: its name {name!r} is not a plain word")
        if name in params:
            raise TargetError(f"parameter {name!r} is given more than once")
        params[name] = value if eq else ""
    if len(params) > MAX_PARAMS:
        raise TargetError(f"more than {MAX_PARAMS} parameters")
    path = "/".join(quote(seg, safe="") for seg in segments) or "/"
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
    return Target(segments, params, path + (f"?{query}" if query else ""))


# --- the management front -------------------------------------------------------------------------
FRONT_KEY_FILE = "front_key.json"
# The registration parameters servetool uses; `handler`, `runtime` and the like would let a caller
# choose code the archive does not hold.
REGISTER_PARAMS = {"url", "model_name", "initial_workers", "synchronous", "batch_size",
                   "max_batch_delay", "response_timeout", "startup_timeout"}
INTEGER_PARAMS = {"initial_workers", "batch_size", "max_batch_delay", "response_timeout",
                  "startup_timeout"}
ARCHIVE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.mar\Z")
MODEL_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
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
    write_private(path, record + "\n")
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


def route_problem(method: str, segments: list[str]) -> tuple[int, str] | None:
    """Why the front does not forward METHOD on this path, or None: only TorchServe's model,
    token and API-description calls pass, each with the methods TorchServe gives it."""
    parts = segments[1:]
    if parts[:1] == ["workflows"]:
        return 403, ("workflows are not served through servetool (they can load code from outside "
                     "the model store)")
    if not parts or parts == ["api-description"]:
        allowed = ("GET", "OPTIONS")
    elif parts == ["token"]:
        allowed = ("GET",)
    elif parts == ["models"]:
        allowed = ("GET", "POST")
    elif parts[0] == "models" and len(parts) in (2, 3):
        allowed = ("GET", "PUT", "DELETE", "OPTIONS")
    elif parts[0] == "models" and len(parts) == 4 and parts[3] == "set-default":
        allowed = ("PUT",)
    else:
        return 404, "no such management resource"
    if method not in allowed:
        return 405, f"{method} is not allowed here (allowed: {', '.join(allowed)})"
    return None


class ManagementFront(App):
    """The management port (an ASGI app under serve_asgi)."""

    server = SERVER_FRONT

    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path

    def authorized(self, scope: dict) -> bool:
        if not token_auth():
            return True
        token = bearer(scope).encode()
        return bool(token) and hmac.compare_digest(token, front_key(self.key_path).encode())

    async def handle(self, scope: dict, receive, send) -> None:
        import asyncio

        try:
            target = canonical_target(raw_target(scope))
        except TargetError as exc:
            raise Refusal(400, f"bad request target: {exc}", close=True) from None
        # Renewing one of TorchServe's keys needs TorchServe's API key, which only the server's
        # user can read: such a request goes through with the caller's own credentials.
        renewal = target.segments[1:] == ["token"]
        if not renewal and not self.authorized(scope):
            raise Refusal(401, "missing or wrong management key: send 'Authorization: Bearer KEY' "
                               "with the key `servetool token --kind management` prints",
                          close=True)
        route = route_problem(scope["method"], target.segments)
        if route:
            raise Refusal(*route, close=True)
        body = await read_body(scope, receive, 0 if renewal else MAX_MANAGEMENT_BODY)
        if scope["method"] == "POST" and target.segments[1:] == ["models"]:
            if body.strip():
                raise Refusal(400, "send the registration parameters in the query string, not "
                                   "the body")
            store = Path(config().get("model_store", "/home/model-server/model-store"))
            problem = registration_problem(target.query, store)
            if problem:
                raise Refusal(403, problem)
        headers = forwarded_headers(scope)
        try:
            key = bearer(scope) if renewal else KEYS.get("management")
            if key:
                headers["authorization"] = f"Bearer {key}"
            status, reply_headers, data = await asyncio.to_thread(
                forward_management, scope["method"], target.rebuilt, body, headers)
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            raise Refusal(503, f"TorchServe's management API is not answering: {exc}") from None
        await send_reply(send, status, reply_headers, data, server=SERVER_FRONT)


def raw_target(scope: dict) -> str:
    query = scope["query_string"].decode("latin-1")
    return scope["raw_path"].decode("latin-1") + (f"?{query}" if query else "")


def forward_management(method: str, target: str, body: bytes,
                       headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = connect("management", timeout=600)
    try:
        conn.request(method, target, body=body or None, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.getheaders(), reply.read()
    finally:
        conn.close()


def run_front(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    key_path = WORK / FRONT_KEY_FILE
    front_key(key_path)
    print(f"front: forwarding to {address('management')[0]}", file=sys.stderr, flush=True)
    serve_asgi(ManagementFront(key_path), host, int(port), "front")


def start_front() -> subprocess.Popen | None:
    """The front beside TorchServe, under a keeper, when its management API is on a Unix socket."""
    if address("management")[1] != 0:
        return None
    listen = os.environ.get("SERVETOOL_FRONT_LISTEN", "0.0.0.0:8081")
    return start_kept("front", [sys.executable, os.path.abspath(__file__), "front", listen])


def client_keys() -> dict:
    """What a client of this server uses: TorchServe's inference and API keys, the front's key for
    management."""
    keys = dict(KEYS.read())
    if address("management")[1] == 0:
        keys["management"] = {"key": front_key(WORK / FRONT_KEY_FILE)}
    return keys


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


class Gateway(App):
    """The pod's front door (an ASGI app under serve_asgi)."""

    server = SERVER_GATEWAY

    def __init__(self) -> None:
        self.local = threading.local()  # one kept-alive upstream connection per worker thread
        self.ready_cache: tuple[float, bool, str] = (-10.0, False, "not checked yet")
        self.keys_cache: tuple[float, list[str]] = (-10.0, [])

    def allowed(self) -> list[str]:
        stamp, keys = self.keys_cache
        if time.monotonic() - stamp > 5:  # a rotated Secret reaches the mount within a minute
            keys = gateway_keys()
            self.keys_cache = (time.monotonic(), keys)
        return keys

    def authorized(self, scope: dict) -> bool:
        token = bearer(scope).encode()
        return bool(token) and any(hmac.compare_digest(token, k.encode()) for k in self.allowed())

    def probe(self, path: str) -> tuple[int, dict] | None:
        if path == "/healthz":
            return 200, {"status": "alive"}
        if path == "/readyz":
            stamp, ok, detail = self.ready_cache
            if time.monotonic() - stamp > 1:
                ok, detail = ready()
                self.ready_cache = (time.monotonic(), ok, detail)
            return (200 if ok else 503), {"status": "ready" if ok else "not ready", "detail": detail}
        return None

    async def handle(self, scope: dict, receive, send) -> None:
        import asyncio

        probed = await asyncio.to_thread(self.probe, scope["path"]) \
            if scope["path"] in ("/healthz", "/readyz") else None
        if probed:
            await send_reply(send, probed[0], [("Content-Type", "application/json")],
                             json.dumps(probed[1]).encode(), server=SERVER_GATEWAY)
            return
        if not self.authorized(scope):
            raise Refusal(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with "
                               "the key from the servetool Secret", close=True)
        try:
            target = canonical_target(raw_target(scope)).rebuilt
        except TargetError as exc:
            raise Refusal(400, f"bad request target: {exc}", close=True) from None
        limit = int(config().get("max_request_size", "6553500"))
        body = await read_body(scope, receive, limit, "max_request_size")
        headers = forwarded_headers(scope)
        try:
            key = KEYS.get("inference")
            if key:
                headers["authorization"] = f"Bearer {key}"
            status, reply_headers, data = await asyncio.to_thread(
                self.upstream, scope["method"], target, body, headers)
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            raise Refusal(503, f"TorchServe in this pod is not answering: {exc}") from None
        await send_reply(send, status, reply_headers, data, server=SERVER_GATEWAY)

    def upstream(self, method: str, target: str, body: bytes, headers: dict[str, str]):
        for attempt in (1, 2):  # a kept-alive connection the server closed is retried once
            conn = getattr(self.local, "conn", None)
            if conn is None:
                host, port = gateway_upstream()
                conn = self.local.conn = http.client.HTTPConnection(host, port, timeout=300)
            try:
                conn.request(method, target, body=body, headers=headers)
                reply = conn.getresponse()
                return reply.status, reply.getheaders(), reply.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        raise RuntimeError("unreachable")


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
    print(f"gateway: forwarding to {gateway_upstream()}", file=sys.stderr)
    serve_asgi(Gateway(), host.strip("[]"), int(port), "gateway")


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
    if command == "keep" and len(argv) > 4 and argv[3] == "--":
        return keep(argv[1], Path(argv[2]), argv[4:])
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
        os.execve(sys.executable, [sys.executable, "-m", "servetool.operate.pod_watch"], env)
    if command == "scale" and len(argv) == 3 and argv[2].isdigit():
        ok, detail = scale(argv[1], int(argv[2]))
        print(detail)
        return 0 if ok else 1
    print("usage: servetool_pod.py torchserve|gateway|front [HOST:PORT]|exec COMMAND...|keys|"
          "health|ready|scale NAME WORKERS|seed DIR|watch|keep NAME STATE_DIR -- COMMAND...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
