"""The traffic split in front of TorchServe (which has none): HAProxy, chosen on measured figures
(benchmarks/canary_proxy.py, README "Canary").

One HAProxy process per deployment listens where clients send predictions and forwards to
TorchServe's inference port. A request to /predictions/MODEL (no version) goes to the canary version
with the model's weight (a percentage), by rewriting its path to /predictions/MODEL/VERSION; every
other request (a version named, another API) passes untouched. Weights and versions live in two
HAProxy maps changed at run time through its admin socket (a Unix socket in the run folder, this
user only), so a step of the canary reconnects nothing and drops nothing. Token auth is
TorchServe's, unchanged: HAProxy passes the Authorization header on.

HAProxy's built-in Prometheus exporter serves its own figures on a loopback port: responses by
status class, per route (backend `default` or `canary`), and response times.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from servetool.errors import ServetoolError

WEIGHTS = "canary-weight.map"
VERSIONS = "canary-version.map"
SOCKET = "haproxy.sock"
CONFIG = "haproxy.cfg"


class SplitError(ServetoolError):
    pass


@dataclass
class SplitOptions:
    run_dir: Path
    listen: tuple[str, int]  # where clients connect
    upstream: tuple[str, int]  # TorchServe's inference API
    metrics: tuple[str, int]  # HAProxy's Prometheus exporter
    threads: int = 1


def haproxy_binary() -> str:
    found = shutil.which("haproxy")
    if found is None:
        raise SplitError("a canary needs HAProxy in front of TorchServe and none is installed: "
                         "apt-get install haproxy")
    return found


def render(opts: SplitOptions) -> Path:
    run = opts.run_dir.resolve()
    run.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, VERSIONS):
        (run / name).touch()
    host, port = opts.listen
    up_host, up_port = opts.upstream
    m_host, m_port = opts.metrics
    config = f"""# Rendered by servetool: the canary split in front of TorchServe (servetool/split.py).
global
    stats socket {run / SOCKET} mode 600 level admin
    nbthread {opts.threads}
    maxconn 4096
    log stderr format short local0 warning

defaults
    mode http
    log global
    option http-keep-alive
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 60s

frontend inference
    bind {host}:{port}
    # /predictions/MODEL without a version: the model's canary weight and version, if it has one
    acl unversioned path_reg ^/predictions/[^/]+/?$
    http-request set-var(txn.model) path,field(3,/) if unversioned
    http-request set-var(txn.weight) var(txn.model),map({run / WEIGHTS},0) if unversioned
    http-request set-var(txn.version) var(txn.model),map({run / VERSIONS},none) if unversioned
    # one draw per request, kept: the path rewrite and the backend must agree (an ACL is
    # evaluated anew at each use, and `unversioned` no longer holds once the path is rewritten)
    http-request set-var(txn.draw) rand(100) if unversioned
    acl drawn var(txn.draw),sub(txn.weight) lt 0
    http-request set-var(txn.canary) bool(1) if unversioned drawn
    acl canary var(txn.canary) -m bool
    http-request set-path /predictions/%[var(txn.model)]/%[var(txn.version)] if canary
    use_backend canary if canary
    default_backend default

backend default
    server torchserve {up_host}:{up_port}

backend canary
    server torchserve {up_host}:{up_port}

frontend metrics
    bind {m_host}:{m_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
"""
    path = run / CONFIG
    path.write_text(config)
    return path


def check_config(path: Path) -> None:
    proc = subprocess.run([haproxy_binary(), "-c", "-q", "-f", str(path)], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        raise SplitError(f"HAProxy refuses {path}: {' '.join(proc.stderr.split())[:400]}")


def start(opts: SplitOptions, timeout_s: float = 10.0) -> subprocess.Popen:
    config = render(opts)
    check_config(config)
    proc = subprocess.Popen([haproxy_binary(), "-W", "-db", "-f", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SplitError("HAProxy exited at start: " + proc.stderr.read().decode()[-400:])
        try:
            with socket.create_connection(opts.listen, timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SplitError(f"HAProxy did not listen on {opts.listen[0]}:{opts.listen[1]} within "
                     f"{timeout_s:.0f} s")


def command(run_dir: Path, line: str) -> str:
    """One command on HAProxy's admin socket; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(str(run_dir.resolve() / SOCKET))
        except OSError as exc:
            raise SplitError(f"HAProxy's admin socket in {run_dir} does not answer: {exc}") from None
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode().strip()


def set_canary(run_dir: Path, model: str, version: str, weight: int) -> None:
    """Send `weight`% of MODEL's unversioned requests to VERSION (0: none)."""
    if not 0 <= weight <= 100:
        raise SplitError(f"a canary weight is a percentage (0 to 100), not {weight}")
    run = run_dir.resolve()
    for name, value in ((VERSIONS, version), (WEIGHTS, str(weight))):
        _write_map(run / name, model, value)  # what HAProxy loads when it starts again
        answer = command(run_dir, f"set map {run / name} {model} {value}")
        if answer:  # "entry not found": the first time for this model
            answer = command(run_dir, f"add map {run / name} {model} {value}")
        if answer:
            raise SplitError(f"HAProxy did not take {name} {model}={value}: {answer}")


def _write_map(path: Path, key: str, value: str) -> None:
    lines = [line for line in path.read_text().splitlines() if line.split(" ", 1)[0] != key]
    path.write_text("".join(f"{line}\n" for line in [*lines, f"{key} {value}"]))


def reset_weight(run_dir: Path, model: str) -> None:
    """MODEL's weight 0 in the map file HAProxy loads at its next start (HAProxy not running)."""
    path = run_dir.resolve() / WEIGHTS
    if path.is_file():
        _write_map(path, model, "0")
