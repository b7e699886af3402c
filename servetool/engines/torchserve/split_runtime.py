"""The canary split at run time, beside HAProxy: wherever the split runs (the local target, and in the
serving image as servetool_split.py, for Docker containers and Kubernetes pods).

Standard library, plus prometheus_client for the exporter. Subcommands:
  serve RUN_DIR CONFIG EXPORTER_PORT [WEIGHTS_FILE]
      start HAProxy with CONFIG and stay its parent: read its per-request log lines from a Unix
      datagram socket in RUN_DIR into Prometheus histograms (served on 127.0.0.1:EXPORTER_PORT,
      which HAProxy's metrics frontend forwards /servetool/metrics to), and, given WEIGHTS_FILE (a
      Kubernetes ConfigMap mount), apply the weights written there to HAProxy's maps.
  set MODEL VERSION WEIGHT [RUN_DIR]
      send WEIGHT% of MODEL's unversioned requests to VERSION (what `servetool canary` runs in a
      container).

Why a log reader: HAProxy's own exporter has response-time averages per backend, no histograms and
no model or version, so the latency "as the client sees it" per model and version (its p99) comes
from HAProxy's log line of each request: the time from the request's headers to the response's,
in microseconds, the status, the path after the split and the X-Model-Version the handler answered.
Log lines are datagrams: under a flood the kernel may drop some, which costs figures, never
requests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

WEIGHTS = "canary-weight.map"
VERSIONS = "canary-version.map"
SOCKET = "haproxy.sock"
LOG_SOCKET = "haproxy-log.sock"
# the request duration buckets, seconds: sub-millisecond models to slow batches
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
MAX_MODELS = 64  # distinct model labels; beyond, "other" (a client must not grow the series)
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class SplitError(Exception):
    pass


# --- the maps ------------------------------------------------------------------------------------
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


def set_weight(run_dir: Path, model: str, version: str, weight: int) -> None:
    """Send `weight`% of MODEL's unversioned requests to VERSION (0: none)."""
    if not 0 <= weight <= 100:
        raise SplitError(f"a canary weight is a percentage (0 to 100), not {weight}")
    if not NAME.match(model) or not NAME.match(version):
        raise SplitError(f"not a model name and version: {model!r} {version!r}")
    run = run_dir.resolve()
    for name, value in ((VERSIONS, version), (WEIGHTS, str(weight))):
        write_map(run / name, model, value)  # what HAProxy loads when it starts again
        answer = command(run, f"set map {run / name} {model} {value}")
        if answer:  # "entry not found": the first time for this model
            answer = command(run, f"add map {run / name} {model} {value}")
        if answer:
            raise SplitError(f"HAProxy did not take {name} {model}={value}: {answer}")


def write_map(path: Path, key: str, value: str) -> None:
    lines = [line for line in read_lines(path) if line.split(" ", 1)[0] != key]
    path.write_text("".join(f"{line}\n" for line in [*lines, f"{key} {value}"]))


def read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def read_map(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in read_lines(path) if " " in line)


def weights(run_dir: Path) -> dict[str, tuple[str, int]]:
    """{model: (canary version, weight)} as the map files say."""
    versions = read_map(run_dir / VERSIONS)
    found = {}
    for model, weight in read_map(run_dir / WEIGHTS).items():
        if model in versions and weight.strip().isdigit():
            found[model] = (versions[model], int(weight))
    return found


def apply_weights_file(run_dir: Path, path: Path, applied: dict) -> dict:
    """Apply a ConfigMap's {"MODEL": {"version": V, "weight": W}} where it changed; `applied` is
    what was applied (and the last complaint, said once, not every poll)."""
    try:
        wanted = json.loads(path.read_text() or "{}")
        if not isinstance(wanted, dict):
            raise ValueError("not a JSON object of models")
    except FileNotFoundError:  # no canary ConfigMap (yet): an optional mount stays empty
        return applied
    except (OSError, ValueError) as exc:
        return _complain(applied, "", f"cannot read {path}: {exc}")
    for model, entry in wanted.items():
        try:
            target = (str(entry["version"]), int(entry["weight"]))
        except (KeyError, TypeError, ValueError) as exc:
            applied = _complain(applied, model, f"{model}: {{\"version\", \"weight\"}} wanted, "
                                f"not {entry!r} ({exc})")
            continue
        if applied.get(model) != target:
            try:
                set_weight(run_dir, model, *target)
                applied = {**applied, model: target}
                print(f"servetool split: {model} {target[1]}% to {target[0]}", flush=True)
            except SplitError as exc:  # HAProxy not up yet: tried again at the next poll
                applied = _complain(applied, model, f"{model}: {exc}")
    return applied


def _complain(applied: dict, key: str, message: str) -> dict:
    if applied.get(("complaint", key)) != message:
        print(f"servetool split: {message}", file=sys.stderr, flush=True)
    return {**applied, ("complaint", key): message}


# --- the exporter --------------------------------------------------------------------------------
class Figures:
    """Per-request histograms from HAProxy's log lines, and the canary weights from the maps."""

    def __init__(self, run_dir: Path) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.run_dir = run_dir
        self.registry = CollectorRegistry()
        self.seconds = Histogram(
            "servetool_request_seconds", "Time from a prediction request's headers to its "
            "response's, at the split in front of TorchServe (what the client sees, less the network)",
            ["model", "version", "status"], buckets=BUCKETS, registry=self.registry)
        self.unparsed = Counter("servetool_split_log_lines_unparsed",
                                "HAProxy log lines the exporter could not read", registry=self.registry)
        self.models: set[str] = set()
        self.registry.register(self)

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("servetool_canary_weight", "Percentage of a model's unversioned "
                                   "requests the split sends to its canary version",
                                   labels=["model", "version"])
        for model, (version, weight) in sorted(weights(self.run_dir).items()):
            family.add_metric([model, version], weight)
        yield family

    def observe(self, line: str) -> None:
        """`STATUS MICROSECONDS ACTIVE_MS VERSION PATH` (HAProxy's "-" where a value is missing)."""
        parts = line.strip().split(" ", 4)
        if len(parts) != 5 or not parts[0].isdigit():
            self.unparsed.inc()
            return
        status, micros, active_ms, served, path = parts
        segments = path.split("?", 1)[0].split("/")
        if len(segments) < 3 or segments[1] != "predictions":
            return  # pings, metadata: not predictions
        model = self._model(segments[2])
        version = served if served != "-" and NAME.match(served) else (
            segments[3] if len(segments) > 3 and NAME.match(segments[3]) else "unknown")
        if micros.lstrip("-").isdigit():
            seconds = max(int(micros), 0) / 1e6
        elif active_ms.isdigit():  # answered by HAProxy itself (no response rules ran)
            seconds = int(active_ms) / 1e3
        else:
            self.unparsed.inc()
            return
        self.seconds.labels(model, version, f"{status[0]}xx").observe(seconds)

    def _model(self, name: str) -> str:
        if not NAME.match(name):
            return "invalid"
        if name not in self.models and len(self.models) >= MAX_MODELS:
            return "other"
        self.models.add(name)
        return name


def read_log(sock: socket.socket, figures: Figures) -> None:
    while True:
        data = sock.recv(8192)
        try:
            figures.observe(data.decode("utf-8", "replace"))
        except Exception as exc:  # a figure lost, never the exporter
            print(f"servetool split: log line {data[:200]!r}: {exc}", file=sys.stderr, flush=True)


def _end_with_parent() -> None:
    """HAProxy ends when this runtime dies, however it dies (kill -9 included): its keeper
    (servetool/engines/torchserve/pod.py keep) starts a new runtime, whose HAProxy must find the port free."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def serve(run_dir: Path, config: Path, exporter_port: int, weights_file: Path | None) -> int:
    from prometheus_client import start_http_server

    run = run_dir.resolve()
    for name in (WEIGHTS, VERSIONS):
        (run / name).touch()
    log_path = run / LOG_SOCKET
    log_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(log_path))  # before HAProxy starts, so no line of its first requests is lost
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    figures = Figures(run)
    start_http_server(exporter_port, "127.0.0.1", registry=figures.registry)
    threading.Thread(target=read_log, args=(sock, figures), daemon=True).start()
    proc = subprocess.Popen([os.environ.get("SERVETOOL_HAPROXY", "haproxy"), "-W", "-db", "-f",
                             str(config)], stdin=subprocess.DEVNULL, preexec_fn=_end_with_parent)
    applied: dict = {}
    # a SIGTERM to this process alone (not its group) must not leave HAProxy behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while proc.poll() is None:
            if weights_file is not None:
                applied = apply_weights_file(run, weights_file, applied)
            time.sleep(2)
    finally:
        if proc.poll() is None:
            proc.terminate()
    return proc.wait()


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) in (4, 5) and argv[3].isdigit():
        return serve(Path(argv[1]), Path(argv[2]), int(argv[3]),
                     Path(argv[4]) if len(argv) == 5 else None)
    if argv[:1] == ["set"] and len(argv) in (4, 5) and argv[3].isdigit():
        run_dir = Path(argv[4] if len(argv) == 5 else
                       os.environ.get("SERVETOOL_WORK_DIR", "/home/model-server/work"))
        try:
            set_weight(run_dir, argv[1], argv[2], int(argv[3]))
        except SplitError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
