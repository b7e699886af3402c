"""The traffic split in front of TorchServe (which has none): HAProxy, chosen on measured figures
(benchmarks/canary_proxy.py, README "Canary").

One HAProxy process per deployment listens where clients send predictions and forwards to
TorchServe's inference port. A request to /predictions/MODEL (no version) goes to the canary version
with the model's weight (a percentage), by rewriting its path to /predictions/MODEL/VERSION; every
other request (a version named, another API) passes untouched. Weights and versions live in two
HAProxy maps changed at run time through its admin socket (a Unix socket in the run folder, this
user only), so a step of the canary reconnects nothing and drops nothing. Token auth is
TorchServe's, unchanged: HAProxy passes the Authorization header on.

HAProxy's built-in Prometheus exporter serves its own figures on a loopback port (/metrics):
responses by status class, per route (backend `default` or `canary`), and response-time averages.
servetool's exporter (split_runtime.py, beside HAProxy) serves on the same port at
/servetool/metrics what HAProxy has not: per model and version, histograms of the time each
prediction took as the client sees it, and the canary weights.

The same rendering serves the local target (paths in the run folder), the serving image (Docker and
Kubernetes: paths in the container's work folder, the text handed over in SERVETOOL_SPLIT_CONFIG_TEXT).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from servetool.engines.torchserve import split_runtime
from servetool.engines.torchserve.split_runtime import LOG_SOCKET, SOCKET, VERSIONS, WEIGHTS
from servetool.errors import ServetoolError

CONFIG = "haproxy.cfg"
EXPORTER_PATH = "/servetool/metrics"  # servetool's figures at the split, beside HAProxy's /metrics
HEADER = ("# Rendered by servetool: the canary split in front of TorchServe "
          "(servetool/engines/torchserve/split.py).")


class SplitError(ServetoolError):
    pass


@dataclass
class SplitOptions:
    run_dir: Path  # where HAProxy finds its maps and sockets (a container's path, in an image)
    listen: tuple[str, int]  # where clients connect
    upstream: tuple[str, int]  # TorchServe's inference API
    metrics: tuple[str, int]  # HAProxy's Prometheus exporter, and servetool's behind it
    exporter_port: int  # servetool's exporter (split_runtime.py), on 127.0.0.1
    threads: int = 1


def haproxy_binary() -> str:
    found = shutil.which("haproxy")
    if found is None:
        raise SplitError("a canary needs HAProxy in front of TorchServe and none is installed: "
                         "apt-get install haproxy")
    return found


def render_text(opts: SplitOptions) -> str:
    run = opts.run_dir
    host, port = opts.listen
    up_host, up_port = opts.upstream
    m_host, m_port = opts.metrics
    return f"""{HEADER}
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
    # one line per request to servetool's exporter (split_runtime.py reads it into histograms)
    no log
    log {run / LOG_SOCKET} len 2048 format raw local0 info
    log-format "%ST %[var(txn.micros)] %Ta %[var(txn.served)] %[var(txn.routed)]"
    http-request set-var(txn.t0) date(0,us)
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
    http-request set-var(txn.routed) path
    http-response set-var(txn.micros) date(0,us),sub(txn.t0)
    http-response set-var(txn.served) res.hdr(X-Model-Version)
    use_backend canary if canary
    default_backend default

backend default
    server torchserve {up_host}:{up_port}

backend canary
    server torchserve {up_host}:{up_port}

frontend metrics
    bind {m_host}:{m_port}
    no log
    http-request use-service prometheus-exporter if {{ path /metrics }}
    use_backend servetool_figures if {{ path {EXPORTER_PATH} }}

backend servetool_figures
    http-request set-path /metrics
    server exporter 127.0.0.1:{opts.exporter_port}
"""


def render(opts: SplitOptions) -> Path:
    run = opts.run_dir.resolve()
    run.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, VERSIONS):
        (run / name).touch()
    path = run / CONFIG
    path.write_text(render_text(opts))
    return path


def check_config(path: Path) -> None:
    proc = subprocess.run([haproxy_binary(), "-c", "-q", "-f", str(path)], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        raise SplitError(f"HAProxy refuses {path}: {' '.join(proc.stderr.split())[:400]}")


def command_line(opts: SplitOptions, config: Path, weights_file: str | None = None) -> list[str]:
    """The process that runs HAProxy and servetool's exporter beside it (split_runtime.py serve)."""
    return [sys.executable, split_runtime.__file__, "serve", str(opts.run_dir), str(config),
            str(opts.exporter_port), *([weights_file] if weights_file else [])]


def start(opts: SplitOptions, timeout_s: float = 10.0) -> subprocess.Popen:
    """HAProxy and its exporter as a process of their own (benchmarks; `deploy --split` starts
    them with TorchServe instead)."""
    config = render(opts)
    check_config(config)
    proc = subprocess.Popen(command_line(opts, config), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True,
                            env={**os.environ, "SERVETOOL_HAPROXY": haproxy_binary()})
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


def set_canary(run_dir: Path, model: str, version: str, weight: int) -> None:
    """Send `weight`% of MODEL's unversioned requests to VERSION (0: none), on this machine."""
    try:
        split_runtime.set_weight(run_dir, model, version, weight)
    except split_runtime.SplitError as exc:
        raise SplitError(str(exc)) from None


def reset_weight(run_dir: Path, model: str) -> None:
    """MODEL's weight 0 in the map file HAProxy loads at its next start (HAProxy not running)."""
    path = run_dir.resolve() / WEIGHTS
    if path.is_file():
        split_runtime.write_map(path, model, "0")
