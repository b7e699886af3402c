"""`servetool watch SOURCE`: new model versions published to a folder or a bucket are served
without anyone rebuilding an image or calling an API (TF Serving's model-base-path polling, for
TorchServe).

Every interval the watcher lists the source (servetool/operate/sources.py). For each model, the newest
complete version it has not handled yet, if newer than the serving default, is fetched, packaged
when it is a model folder (the gate and pre-flight included), checked (its archive names this model
and version; the digest the marker names), then installed the way `deploy` installs a version
(servetool/operate/lifecycle.py): registered with its workers, smoke-tested on its own URL, made the
default, and versions beyond the keep policy unloaded after they drained. A version that fails any
step never takes traffic; the failure is logged, kept in the watcher's state (`servetool status`,
`servetool versions`) and counted in its metrics. A version removed from the source is unloaded,
unless it is the only one serving.

A failure is judged temporary or permanent (`transient_reason`). Temporary: a full disk (ENOSPC,
EDQUOT), the bucket unreachable, timing out or throttling (5xx, SlowDown), TorchServe unreachable or
answering 502/503/504/507, the lifecycle lock busy. Such a version is tried again after a backoff
(30 s doubling up to 15 min, at most 8 attempts; Watcher's retry_* arguments), and the state says
why, which attempt, and when the next one is. Permanent (the gate, a bad or altered archive, a
handler that cannot load, a failed smoke test) and temporary failures past their last attempt
wait for the version to be published again: new content, or the same bytes uploaded anew (a new
ctime in a folder, a new LastModified in a bucket, where the ETag stays the same). Symbolic links in
a watched folder are refused with an event that says so (servetool/operate/sources.py).

An install the watcher was killed in the middle of is settled at its next check (the first one
after it starts): servetool/operate/lifecycle.py's restore finishes or undoes it, so that deployed.json and
TorchServe agree, and the version is then published again.

The state (what was handled, the last check, the last event per model) lives in
RUN_DIR/watch-state.json, so a restarted watcher does not redo its work.

    python -m servetool.operate.watch RUN_DIR     (the background watcher of `deploy --watch`)
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from servetool import runfiles
from servetool.engines.torchserve import archive
from servetool.engines.torchserve.management import check_name, check_version
from servetool.errors import ServetoolError, whole_cause
from servetool.operate import lifecycle
from servetool.operate.daemon import Daemon
from servetool.operate.sources import (
    MODEL_FOLDER,
    BucketSource,
    FolderSource,
    Published,
    SourceError,
    open_source,
)
from servetool.targets import record

STATE_FILE = "watch-state.json"
DEFAULT_METRICS_PORT = 8090
# a temporary failure is tried again after RETRY_BASE_S, doubling up to RETRY_MAX_S, at most
# RETRY_ATTEMPTS attempts in all; then (as a permanent one) when the version is published again
RETRY_BASE_S = 30.0
RETRY_MAX_S = 900.0
RETRY_ATTEMPTS = 8
WAITING = ("failed", "refused")  # outcomes that wait for a retry or a new upload

TRANSIENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
    errno.ETIMEDOUT: "a connection timed out", errno.ECONNREFUSED: "a connection was refused",
    errno.ECONNRESET: "a connection was reset", errno.ECONNABORTED: "a connection was aborted",
    errno.EHOSTUNREACH: "a host is unreachable", errno.ENETUNREACH: "the network is unreachable",
    errno.ENETDOWN: "the network is down", errno.EAGAIN: "a resource is temporarily unavailable",
    errno.ENOMEM: "out of memory", errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system", errno.ESTALE: "a stale network file handle",
}
# what a server's own log says when its disk is full (quoted inside a registration's error)
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def transient_reason(exc: BaseException) -> str:
    """Why a failure may pass by itself ('' when it will not: a gate failure, a bad or altered
    archive, a handler that cannot load, a failed smoke test are permanent). The whole chain of
    causes is read, also those a wrapper suppressed (`raise ... from None` keeps __context__)."""
    import requests

    from servetool.engines.torchserve.management import APIError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, SourceError) and current.transient:
            return current.transient
        if isinstance(current, runfiles.LockBusy):
            return "the lifecycle lock is held by another process"
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return TRANSIENT_ERRNOS[current.errno]
        if isinstance(current, requests.Timeout):
            return "TorchServe did not answer in time"
        if isinstance(current, requests.ConnectionError):
            return "TorchServe could not be reached"
        if isinstance(current, APIError) and current.status in (429, 502, 503, 504, 507):
            return f"TorchServe answered {current.status}"
        if any(text in str(current) for text in DISK_FULL_TEXT):
            return "no space left on the device"
        current = current.__cause__ or current.__context__
    return ""


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class WatchError(ServetoolError):
    pass


def daemon(run_dir: Path) -> Daemon:
    return Daemon(run_dir, "watcher", "servetool.operate.watch")


def _stamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class Metrics:
    """The watcher's Prometheus metrics, served on 127.0.0.1:PORT/metrics (port 0: none)."""

    def __init__(self, port: int | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.checks = Counter("servetool_watch_checks", "Listings of the source",
                              registry=self.registry)
        self.check_errors = Counter("servetool_watch_check_errors",
                                    "Listings that failed (source unreachable, bad credentials)",
                                    registry=self.registry)
        self.last_check = Gauge("servetool_watch_last_check_timestamp_seconds",
                                "When the source was last listed", registry=self.registry)
        self.publishes = Counter("servetool_watch_publishes", "Versions handled, by outcome",
                                 ["model", "outcome"], registry=self.registry)
        self.failed = Gauge("servetool_watch_failed_versions",
                            "Versions that failed and wait for new content", ["model"],
                            registry=self.registry)
        self.seconds = Histogram("servetool_watch_publish_seconds",
                                 "From the version seen to it serving as the default", ["model"],
                                 buckets=(1, 2, 5, 10, 20, 60, 300, 1800), registry=self.registry)
        self.address: str | None = None
        if port:
            from prometheus_client import start_http_server

            try:
                start_http_server(port, addr="127.0.0.1", registry=self.registry)
            except OSError as exc:
                raise WatchError(f"the watcher's metrics port 127.0.0.1:{port} cannot be used "
                                 f"({exc.strerror}); pick another with --metrics-port") from None
            self.address = f"http://127.0.0.1:{port}/metrics"


class Watcher:
    def __init__(self, target: Any, source: FolderSource | BucketSource, *,
                 interval_s: float | None = None, keep: int | None = None,
                 metrics_port: int | None = None, timeout_s: float = 300,
                 say: Callable[[str], None] = print, retry_base_s: float = RETRY_BASE_S,
                 retry_max_s: float = RETRY_MAX_S, retry_attempts: int = RETRY_ATTEMPTS) -> None:
        self.target = target
        self.source = source
        self.interval_s = interval_s or source.default_interval_s
        self.keep = keep
        self.timeout_s = timeout_s
        self.say = say
        self.retry_base_s = retry_base_s
        self.retry_max_s = max(retry_max_s, retry_base_s)
        self.retry_attempts = max(1, retry_attempts)
        self._unsaved: str | None = None
        self.run_dir = Path(target.opts.run_dir).resolve()
        self.state_file = self.run_dir / STATE_FILE
        self.state = self._load()
        self.metrics = Metrics(metrics_port)
        self.state |= {"source": source.url, "interval_s": self.interval_s, "pid": os.getpid(),
                       "started": _stamp(), "metrics": self.metrics.address}
        for model, versions in self.state["versions"].items():
            self.metrics.failed.labels(model).set(
                sum(v.get("outcome") in WAITING for v in versions.values()))
        self._save()

    # --- state -----------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("source") != self.source.url:  # another source: nothing of it was handled
            state = {}
        return {"versions": {}, "events": {}, "last_check": None, "last_error": None} | state

    def _save(self) -> None:
        try:
            runfiles.private_folder(self.run_dir)
            runfiles.write_private(self.state_file, json.dumps(self.state, indent=2) + "\n")
        except OSError as exc:  # a full disk must not end the watcher: the state waits in memory
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if self._unsaved is None:
                self.say(f"the watcher's state could not be written to {self.state_file} "
                         f"({exc.strerror}); kept in memory and written once there is space")
            self._unsaved = exc.strerror
            return
        if self._unsaved is not None:
            self.say(f"the watcher's state is written to {self.state_file} again")
            self._unsaved = None

    def _mark(self, published: Published, outcome: str, detail: str,
              **extra: Any) -> dict[str, Any]:
        event = {"at": _stamp(), "model": published.model, "version": published.version,
                 "outcome": outcome, "detail": detail, **extra}
        versions = self.state["versions"].setdefault(published.model, {})
        versions[published.version] = {"fingerprint": published.fingerprint,
                                       "uploaded": published.uploaded, **event}
        self.state["events"][published.model] = event
        self.metrics.publishes.labels(published.model, outcome).inc()
        self.metrics.failed.labels(published.model).set(
            sum(v.get("outcome") in WAITING for v in versions.values()))
        self.say(f"{published.model} {published.version}: {outcome}: {detail}")
        self._save()
        return event

    # --- one check -------------------------------------------------------------------------------
    def check_once(self) -> list[dict[str, Any]]:
        """List the source and act on what changed; the events of this check."""
        self.metrics.checks.inc()
        self.state["last_check"] = _stamp()
        self.metrics.last_check.set_to_current_time()
        try:
            published = self.source.scan()
        except SourceError as exc:
            return self._check_failed(str(exc))
        if self.target.running() is None:
            return self._check_failed("the server is not running (`servetool deploy` starts it); "
                                      "nothing was loaded")
        self._settle_interrupted()
        self.state["last_error"] = None
        by_model: dict[str, list[Published]] = {}
        for item in published:
            by_model.setdefault(item.model, []).append(item)
        events = []
        for model, items in by_model.items():
            events += self._check_model(model, items)
        events += self._check_removed(by_model)
        self._save()
        return events

    def _settle_interrupted(self) -> None:
        """An install whose process died in the middle (this watcher killed mid-install, say)
        left its intent in deployed.json: the lifecycle's restore finishes or undoes it, so that
        the record and TorchServe agree, before anything else is done. An install still running
        in another process (a person's `deploy`) is left to it."""
        stale = [f"{name} {intent.get('version')} (pid {intent.get('pid')})"
                 for name, model in record.read_record(self.run_dir).items()
                 if isinstance(intent := model.get(lifecycle.INTENT), dict)
                 and (intent.get("pid") == os.getpid() or not _alive(intent.get("pid")))]
        if not stale:
            return
        self.say(f"an install was interrupted: {', '.join(stale)}; settling it")
        for result in lifecycle.Lifecycle(self.target).restore(self.timeout_s):
            self.say(f"{result['name']} {result['version']}: {result['action']}")

    def _due(self, seen: dict[str, Any] | None, item: Published) -> bool:
        """Whether a complete version is handled at this check: new content, a failed version
        uploaded again (same bytes too) or whose next retry has come."""
        if not seen or seen.get("fingerprint") != item.fingerprint:
            return True
        if seen.get("outcome") not in WAITING:
            return False
        if item.uploaded and seen.get("uploaded") != item.uploaded:
            return True
        return bool(seen.get("retry_at_s")) and time.time() >= float(seen["retry_at_s"])

    def _failed(self, item: Published, exc: BaseException) -> dict[str, Any]:
        """Mark a failed version: a temporary failure with its next attempt (backoff doubling,
        capped), a permanent one (or the last attempt) waiting for a new upload."""
        detail = str(exc) if isinstance(exc, ServetoolError) else whole_cause(exc)
        reason = transient_reason(exc)
        before = self.state["versions"].get(item.model, {}).get(item.version, {})
        again = before.get("outcome") == "failed" and before.get("fingerprint") == \
            item.fingerprint and before.get("uploaded", item.uploaded) == item.uploaded
        attempts = int(before.get("attempts") or 1) + 1 if again else 1
        retry: dict[str, Any] = {"transient": reason, "attempts": attempts, "retry_at": None,
                                 "retry_at_s": None}
        if reason and attempts < self.retry_attempts:
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** (attempts - 1))
            when = time.time() + delay
            retry |= {"retry_at": datetime.fromtimestamp(when).astimezone().isoformat(
                timespec="seconds"), "retry_at_s": when}
            detail += (f"; a temporary failure ({reason}): attempt {attempts} of "
                       f"{self.retry_attempts}, tried again at {retry['retry_at']} (in {delay:g} s) "
                       "or when it is published again; the serving default is unchanged")
        elif reason:
            detail += (f"; a temporary failure ({reason}), and that was the last of "
                       f"{self.retry_attempts} attempts: tried again when it is published again "
                       "(the same bytes uploaded anew will do); the serving default is unchanged")
        else:
            detail += ("; the serving default is unchanged, and this version is tried again when "
                       "it is published again (new content, or the same uploaded anew)")
        return self._mark(item, "failed", detail, **retry)

    def _check_failed(self, reason: str) -> list[dict[str, Any]]:
        self.metrics.check_errors.inc()
        if self.state.get("last_error") != reason:
            self.say(f"check failed: {reason}")
        self.state["last_error"] = reason
        self._save()
        return []

    def _check_model(self, model: str, items: list[Published]) -> list[dict[str, Any]]:
        seen = self.state["versions"].get(model, {})
        due = [p for p in items if p.complete and self._due(seen.get(p.version), p)]
        events = [self._mark(p, "refused", p.refused) for p in due if p.refused]
        new = [p for p in due if not p.refused]
        if not new:
            return events
        recorded = record.read_record(self.run_dir).get(model, {})
        default = recorded.get("default")
        winner = None
        for item in sorted(new, key=lambda p: lifecycle.version_key(p.version), reverse=True):
            if winner is not None:
                events.append(self._mark(item, "superseded", f"{winner} was published too and is "
                                                             "newer; this one was not loaded"))
            elif default and item.version != default and \
                    lifecycle.version_key(item.version) < lifecycle.version_key(default):
                events.append(self._mark(item, "older", f"older than the serving default "
                                                        f"{default}: not loaded (`servetool "
                                                        f"promote` after deploying it, if meant)"))
            else:
                event = self._publish(item)
                if event is None:  # the server went away meanwhile: the next check tries again
                    break
                events.append(event)
                if event["outcome"] == "serving":
                    winner = item.version
        return events

    def _publish(self, item: Published) -> dict[str, Any] | None:
        started = time.monotonic()
        staging = self.run_dir / "watch-staging" / f"{item.model}-{item.version}"
        try:
            check_name(item.model, "model folder")
            check_version(item.version)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            self.say(f"{item.model} {item.version}: published in {self.source.url}; fetching")
            self.source.fetch(item, staging)
            path = self._archive(item, staging)
            self._check_immutable(item, path)
            result = lifecycle.Lifecycle(self.target).install(
                path, origin=self.source.url, keep=self.keep, timeout_s=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 (whatever a version does, the watcher goes on)
            if self.target.running() is None:
                self._check_failed(f"the server stopped while {item.model} {item.version} was "
                                   f"being loaded: {whole_cause(exc)}")
                return None
            return self._failed(item, exc)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.monotonic() - started
        self.metrics.seconds.labels(item.model).observe(seconds)
        return self._mark(item, "serving", f"{result['action']}, the default after {seconds:.1f} s")

    def _archive(self, item: Published, staging: Path) -> Path:
        """The version's archive, checked; a model folder is packaged first (gate, pre-flight)."""
        kind = item.kind
        if kind == "archive":
            path = staging / next(f for f in item.files if f.endswith(".mar") and "/" not in f)
            want = str(item.marker.get("sha256") or "").lower()
            if want:
                got = hashlib.sha256(path.read_bytes()).hexdigest()
                if got != want:
                    raise WatchError(f"{path.name} has SHA-256 {got[:16]}..., its READY marker "
                                     f"names {want[:16]}...: a partial or altered upload")
        elif kind == "folder":
            try:
                from servetool.model.spec import load_spec
                from servetool.operate.package import package
            except ImportError as exc:
                raise WatchError(f"a model folder is packaged by the full servetool, and this "
                                 f"watcher runs without its export tools ({exc}; a Kubernetes "
                                 "pod): publish the .mar `servetool package` builds") from None

            spec = load_spec(staging)
            if spec.name != item.model:
                raise WatchError(f"its servetool.yaml names model {spec.name!r}, but it was "
                                 f"published under {item.model}/")
            spec = dataclasses.replace(spec, version=item.version)  # the folder says which
            self.say(f"{item.model} {item.version}: a model folder: packaging (export, gate, "
                     "pre-flight)")
            path = Path(package(spec, staging / ".built", progress=self.say)["archive"])
        else:
            raise WatchError(f"the version folder holds {kind}")
        meta = archive.archive_manifest(path)["manifest"]["model"]
        if (meta.get("modelName"), str(meta.get("modelVersion"))) != (item.model, item.version):
            raise WatchError(f"{path.name} is {meta.get('modelName')} {meta.get('modelVersion')}, "
                             f"but it was published as {item.model}/{item.version}/")
        return path

    def _check_immutable(self, item: Published, path: Path) -> None:
        """A version that serves keeps its bytes: re-registering it would leave a gap (and a
        client could not tell the two apart by X-Model-Version). A change is a new version."""
        recorded = record.read_record(self.run_dir).get(item.model, {}).get("versions", {})
        known = recorded.get(item.version, {}).get("digest")
        if known and known != archive.archive_digest(path):
            raise WatchError(f"version {item.version} is loaded with other content; versions are "
                             "immutable here: publish the change as a new version")

    def _check_removed(self, by_model: dict[str, list[Published]]) -> list[dict[str, Any]]:
        """Versions this source put in service and no longer holds are unloaded (never the last)."""
        events = []
        for model, recorded in record.read_record(self.run_dir).items():
            present = {p.version for p in by_model.get(model, [])}
            if MODEL_FOLDER in present:  # its folder is a link now: refused, nothing unloaded
                continue
            for version, entry in list(recorded.get("versions", {}).items()):
                if entry.get("source") != self.source.url or version in present:
                    continue
                gone = Published(model, version, False, "removed")
                seen = self.state["versions"].get(model, {}).get(version, {})
                try:
                    lifecycle.Lifecycle(self.target).unload(model, version)
                except ServetoolError as exc:
                    if seen.get("outcome") != "kept":
                        events.append(self._mark(gone, "kept", f"removed from the source, but {exc}"))
                    continue
                events.append(self._mark(gone, "removed", "removed from the source: unloaded"))
        return events

    # --- the loop --------------------------------------------------------------------------------
    def run(self, stopping: Callable[[], bool] = lambda: False) -> None:
        self.say(f"watching {self.source.url} every {self.interval_s:g} s"
                 + (f"; metrics on {self.metrics.address}" if self.metrics.address else ""))
        while not stopping():
            begun = time.monotonic()
            try:
                self.check_once()
            except Exception as exc:  # noqa: BLE001 (the server's API failing mid-check, and the like)
                self._check_failed(whole_cause(exc))
            while not stopping() and time.monotonic() - begun < self.interval_s:
                time.sleep(0.1)


def describe(run_dir: Path) -> dict[str, Any] | None:
    """The watcher of a run folder, for `servetool status`: source, liveness, last check, events."""
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    alive = bool(pid) and Path(f"/proc/{pid}").exists() and \
        b"servetool" in Path(f"/proc/{pid}/cmdline").read_bytes()
    waiting = [{"model": m, **v} for m, vs in state.get("versions", {}).items()
               for v in vs.values() if v.get("outcome") in WAITING]
    return {"source": state.get("source"), "running": alive, "pid": pid if alive else None,
            "interval_s": state.get("interval_s"), "last_check": state.get("last_check"),
            "last_error": state.get("last_error"), "metrics": state.get("metrics"),
            "events": state.get("events", {}),
            # failed: each with why (`transient`: the temporary cause, '' when permanent), its
            # `attempts` and `retry_at` (None: it waits to be published again)
            "failed": [v for v in waiting if v["outcome"] == "failed"],
            "refused": [v for v in waiting if v["outcome"] == "refused"]}


def retry_text(entry: dict[str, Any]) -> str:
    """A failed version's state in a few words, for `servetool versions`."""
    if entry.get("outcome") == "refused":
        return "refused"
    if not entry.get("transient"):
        return "failed (permanent): waits to be published again"
    attempts = f"attempt {entry.get('attempts') or 1}"
    if entry.get("retry_at"):
        return f"failed (temporary: {entry['transient']}), {attempts}, retry at {entry['retry_at']}"
    return (f"failed (temporary: {entry['transient']}), {attempts} was the last: waits to be "
            "published again")


# --- the background watcher of `deploy --watch` ---------------------------------------------------
def make_target(options: dict[str, Any], say: Callable[[str], None]) -> Any:
    from servetool.engines.torchserve.process import ServerOptions

    server = options["server"]
    opts = ServerOptions(run_dir=Path(server["run_dir"]), model_store=Path(server["model_store"]),
                         ports={k: int(v) for k, v in server["ports"].items()},
                         host=server.get("host", "127.0.0.1"))
    if options.get("target") == "docker":
        from servetool.targets.docker import DockerOptions, DockerTarget
        from servetool.targets.image import ImageOptions

        return DockerTarget(opts, DockerOptions(ImageOptions(opts.model_store, bake_models=False),
                                                container_name=options["container_name"],
                                                cpus=options.get("cpus")), say)
    from servetool.targets.local import LocalTarget

    return LocalTarget(opts, say)


def launch(target: Any, source: str, *, endpoint_url: str | None, interval_s: float | None,
           keep: int | None, metrics_port: int | None,
           retry: dict[str, float] | None = None) -> int:
    """Start the background watcher of this deployment (replacing one that watches elsewhere)."""
    from servetool.engines.torchserve.process import port_in_use

    run_dir = Path(target.opts.run_dir).resolve()
    opened = open_source(source, endpoint_url)
    opened.scan()  # a source that cannot be listed is said now, not in a log file later
    options = {"target": target.name, "source": opened.url, "endpoint_url": endpoint_url,
               "interval_s": interval_s, "keep": keep, "metrics_port": metrics_port,
               "server": {"run_dir": str(run_dir),
                          "model_store": str(Path(target.opts.model_store).resolve()),
                          "ports": target.opts.ports, "host": target.opts.host}}
    if target.name == "docker":
        options |= {"container_name": target.docker_opts.container_name,
                    "cpus": target.docker_opts.cpus}
    if retry:  # {"base_s", "max_s", "attempts"}: the backoff of temporary failures
        options["retry"] = retry
    watcher = daemon(run_dir)
    if watcher.pid() is not None:
        if watcher.options() == options:
            return watcher.pid()
        watcher.stop()
    if metrics_port and port_in_use("127.0.0.1", metrics_port):
        raise WatchError(f"the watcher's metrics port 127.0.0.1:{metrics_port} is in use; pick "
                         "another with --watch-metrics-port (0: no metrics endpoint)")
    return watcher.launch(options)


def main(run_dir: Path) -> int:
    options = daemon(run_dir).options()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def say(message: str) -> None:
        print(f"{_stamp()} {message}", flush=True)

    try:
        watcher = Watcher(make_target(options, say),
                          open_source(options["source"], options.get("endpoint_url")),
                          interval_s=options.get("interval_s"), keep=options.get("keep"),
                          metrics_port=options.get("metrics_port"), say=say,
                          **{f"retry_{key}": value for key, value in
                             (options.get("retry") or {}).items()})
    except ServetoolError as exc:
        say(f"the watcher cannot start: {exc}")
        return 1
    watcher.run(lambda: bool(stop))
    say("watcher stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
