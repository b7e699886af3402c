"""A closed-loop HTTP load generator for a served model: `servetool bench serve`.

Each of `concurrency` clients keeps one keep-alive connection and sends the next request as soon as
the last answer arrived. Every request sent is accounted for exactly once: answered 2xx, answered
with an error status, or lost (the connection failed or timed out before any answer). The
generator also reports its own CPU use, because on a small machine a load generator that eats a
core is part of what it measures.

Two engines: Debian's `wrk` (compiled; about a tenth of the Python engine's CPU per request, which
matters for models that answer in a few milliseconds) where it is installed, and a Python one
(threads with http.client) that also records every request and can send an exact count.

Keys expire (TorchServe's token_expiration_min). The Python engine sends a request the server
refused for its key once more, with the key read again and renewed if it has expired (`Auth`); wrk
cannot change its key mid-run, so a run that would outlive the key is cut into rounds that end
before it expires, the key renewed between them (the summary says how many).
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from servetool.engines.torchserve.management import key_refused
from servetool.errors import ServetoolError

Payload = tuple[bytes, str]  # body, content type
CONTENT_TYPES = {".json": "application/json"}
# wrk reports its latency at these percentiles (0: the fastest, 100: the slowest), so that the
# rounds of a run can be merged into one distribution
WRK_PERCENTILES = [0, *range(1, 100), 99.5, 99.9, 100]
KEY_MARGIN_S = 1.0  # a wrk round ends this long before the key expires (requests in flight)
RENEW_PAUSE_S = 1.0  # after a renewal gave nothing new, no other try for this long


class Auth:
    """The Authorization header a load sends, shared by its clients and renewed when the server
    refuses it: `renew` reads the server's key file again and renews an expired key (through the
    management API: servetool.engines.torchserve.management.Client.token), returning the header to send."""

    def __init__(self, header: str | None, renew: Callable[[], str | None] | None = None) -> None:
        self.header = header
        self._renew = renew
        self._lock = threading.Lock()
        self._quiet_until = 0.0
        self.renewals = 0
        self.error: str | None = None  # why the last renewal failed

    def headers(self) -> dict[str, str]:
        return {"Authorization": self.header} if self.header else {}

    def renewed(self, refused: str | None) -> str | None:
        """The header to send again a request that `refused` was refused with; None when there is
        no other (nothing to renew with, the key file gives the same key, or renewing failed)."""
        with self._lock:
            if self.header != refused:  # another client renewed it meanwhile
                return self.header
            if self._renew is None or time.monotonic() < self._quiet_until:
                return None
            try:
                fresh = self._renew()
            except Exception as exc:  # noqa: BLE001 (said in the summary; the load goes on)
                self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                fresh = None
            if not fresh or fresh == refused:
                self._quiet_until = time.monotonic() + RENEW_PAUSE_S
                return None
            self.header, self.error = fresh, None
            self.renewals += 1
            return fresh


@dataclass
class Sample:
    start_s: float  # since the run began
    latency_ms: float
    status: int  # 0: lost
    version: str | None = None  # the X-Model-Version that answered (servetool's handler says it)


@dataclass
class LoadResult:
    url: str
    concurrency: int
    duration_s: float
    sent: int
    ok: int
    errors: dict[int, int]
    lost: int
    generator_cpu_s: float
    samples: list[Sample] = field(default_factory=list, repr=False)
    engine: str = "python"
    # wrk reports percentiles, not requests: {"p50_ms": ..., "p90_ms": ..., "p99_ms": ..., "mean_ms"}
    reported_latency_ms: dict[str, float] | None = None
    retried: int = 0  # requests refused for their key and sent again with a renewed one
    key_renewals: int = 0
    rounds: int = 1  # wrk runs that made up the load (a new one after each key renewal)
    key_error: str | None = None  # why renewing the key failed, if it did

    def _ok_latencies(self) -> np.ndarray:
        return np.array([s.latency_ms for s in self.samples if 200 <= s.status < 300])

    def summary(self) -> dict[str, Any]:
        lat = self._ok_latencies()
        pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if lat.size else (lambda q: None)
        if self.reported_latency_ms is not None:
            pct = lambda q: self.reported_latency_ms[f"p{q}_ms"]  # noqa: E731
        mean = self.reported_latency_ms["mean_ms"] if self.reported_latency_ms else (
            round(float(lat.mean()), 2) if lat.size else None)
        return {
            "engine": self.engine, "url": self.url, "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 2), "sent": self.sent, "ok": self.ok,
            "errors": {str(k): v for k, v in sorted(self.errors.items())}, "lost": self.lost,
            "throughput": round(self.ok / self.duration_s, 2) if self.duration_s else 0.0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "mean_ms": mean,
            # share of one core the generator itself used: its overhead on the machine
            "generator_cpu_share": round(self.generator_cpu_s / self.duration_s, 3)
            if self.duration_s else 0.0,
            "generator_cpu_ms_per_request": round(1000 * self.generator_cpu_s / max(1, self.sent), 3),
            "key_renewals": self.key_renewals, "retried": self.retried, "rounds": self.rounds,
            **({"key_error": self.key_error} if self.key_error else {}),
        }


def payload_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ValueError("no payload files given")
    return files


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def load_payloads(paths: list[Path]) -> list[Payload]:
    return [(f.read_bytes(), content_type(f)) for f in payload_files(paths)]


WRK_SCRIPT = Path(__file__).resolve().parent.parent / "resources" / "wrk_report.lua"


def wrk_path() -> str | None:
    return shutil.which("wrk")


class LoadError(ServetoolError, RuntimeError):
    """The load could not run (wrk missing or failing, a key that cannot be renewed)."""


def run_wrk(url: str, files: list[Path], *, concurrency: int = 8, duration_s: float = 20.0,
            headers: dict[str, str] | None = None, timeout_s: float = 30.0,
            auth: Auth | None = None, key_expires_at: Callable[[], float | None] | None = None,
            progress: Callable[[str], None] | None = None) -> LoadResult:
    """The same closed loop, driven by wrk (one thread is plenty at these rates).

    wrk sends one Authorization header for its whole run. With `auth` (the header to send) and
    `key_expires_at` (when that key expires, seconds since the epoch, or None), a run the key would
    not outlast is cut into rounds of whole seconds that end KEY_MARGIN_S before it expires; the key
    is renewed once it has expired (never before: renewing revokes it for every other client), and
    the next round sends the new one. The rounds' counts add up and their latency distributions are
    merged; the duration is the time wrk ran, without the waits for a key to expire."""
    wrk = wrk_path()
    if wrk is None:
        raise LoadError("wrk is not installed (apt-get install wrk)")
    say = progress or (lambda _: None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    reports: list[dict[str, Any]] = []
    left = max(1, round(duration_s))
    while left > 0:
        seconds = left
        expires = key_expires_at() if auth is not None and key_expires_at is not None else None
        if expires is not None:
            usable = math.floor(expires - time.time() - KEY_MARGIN_S)
            if usable < 1:  # too little of this key is left for a round: renew it once expired
                time.sleep(max(0.0, expires - time.time()) + 0.05)
                _renew_expired(auth, key_expires_at)
                say("the inference key expired: renewed it for the next wrk round")
                continue
            if usable < left and not reports:
                say(f"the inference key expires in {expires - time.time():.0f} s: wrk runs in "
                    "rounds that end before it expires, the key renewed between them")
            seconds = min(left, usable)
        sent_headers = {**(headers or {}), **(auth.headers() if auth is not None else {})}
        reports.append(_wrk_round(wrk, url, files, concurrency, seconds, sent_headers, timeout_s))
        left -= seconds
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    statuses: Counter[int] = Counter()
    for report in reports:
        statuses.update({int(k): v for k, v in report["statuses"].items()})
    lost = sum(r["connect"] + r["read"] + r["write"] + r["timeout"] for r in reports)
    return LoadResult(
        url=url, concurrency=concurrency, duration_s=sum(r["duration_us"] for r in reports) / 1e6,
        sent=sum(r["requests"] for r in reports) + lost,
        ok=sum(n for code, n in statuses.items() if 200 <= code < 300),
        errors={code: n for code, n in statuses.items() if not 200 <= code < 300}, lost=lost,
        generator_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        engine="wrk", reported_latency_ms=_merged_latency(reports), rounds=len(reports),
        key_renewals=auth.renewals if auth is not None else 0)


def _renew_expired(auth: Auth, key_expires_at: Callable[[], float | None]) -> None:
    refused = auth.header
    if auth.renewed(refused) in (None, refused):
        raise LoadError("the inference key expired and could not be renewed"
                        + (f": {auth.error}" if auth.error else ""))
    expires = key_expires_at()
    if expires is not None and expires - time.time() < 1 + KEY_MARGIN_S:
        raise LoadError(f"the inference key lasts {max(0.0, expires - time.time()):.1f} s "
                        "(token_expiration_min), too little for a wrk round of a whole second: "
                        "use --engine python, which renews the key on its own")


def _wrk_round(wrk: str, url: str, files: list[Path], concurrency: int, seconds: int,
               headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """One wrk run: its report (servetool/resources/wrk_report.lua)."""
    # The key goes through the environment (readable by this user only), never the command line,
    # which every local user can read with `ps`.
    env = {**os.environ, "SERVETOOL_WRK_AUTH": headers.get("Authorization", ""),
           "SERVETOOL_WRK_PERCENTILES": ",".join(str(p) for p in WRK_PERCENTILES)}
    args = [item for f in files for item in (str(f.resolve()), content_type(f))]
    cmd = [wrk, "-t", "1", "-c", str(concurrency), "-d", f"{seconds}s",
           "--timeout", f"{max(1, round(timeout_s))}s", "-s", str(WRK_SCRIPT), url, "--", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=seconds + timeout_s + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SERVETOOL_WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise LoadError(f"wrk failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    return json.loads(line.split(" ", 1)[1])


def _merged_latency(reports: list[dict[str, Any]]) -> dict[str, float]:
    """p50/p90/p99 and the mean of the rounds' answers together: one round's are wrk's own; for
    several, each round's distribution (its latency at WRK_PERCENTILES) weighted by its requests."""
    if len(reports) == 1:
        r = reports[0]
        return {"p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
                "p99_ms": r["p99_us"] / 1000, "mean_ms": round(r["mean_us"] / 1000, 2)}
    weights = np.array([max(0, r["requests"]) for r in reports], dtype=float)
    if not weights.sum():
        weights[:] = 1.0
    weights /= weights.sum()
    curves = [np.maximum.accumulate(np.asarray(r["latency_us"], dtype=float)) for r in reports]
    grid = np.unique(np.concatenate(curves))
    share = np.asarray(WRK_PERCENTILES, dtype=float) / 100
    below = sum(w * np.interp(grid, c, share, left=0.0, right=1.0)
                for w, c in zip(weights, curves, strict=True))

    def at(q: float) -> float:
        return round(float(grid[min(int(np.searchsorted(below, q)), grid.size - 1)]) / 1000, 3)

    mean = sum(w * r["mean_us"] for w, r in zip(weights, reports, strict=True))
    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
            "mean_ms": round(float(mean) / 1000, 2)}


def run_load(url: str, payloads: list[Payload], *, concurrency: int = 8,
             duration_s: float | None = 20.0, requests: int | None = None,
             headers: dict[str, str] | None = None, timeout_s: float = 30.0,
             progress: Callable[[str], None] | None = None,
             stop: threading.Event | None = None, auth: Auth | None = None) -> LoadResult:
    """Drive `url` with POSTs until `requests` are sent, `duration_s` has passed or `stop` is set
    (a steady load behind something else being measured). With `auth`, the Authorization header
    is its current one, and a request refused for its key is sent once more with a renewed key
    (one request in the counts, with the answer and the time of both tries)."""
    if requests is None and duration_s is None and stop is None:
        raise ValueError("give a request count, a duration or a stop event")
    parts = urlsplit(url)
    path = parts.path or "/"
    tickets = itertools.count()
    samples: list[list[Sample]] = [[] for _ in range(concurrency)]
    retried = [0] * concurrency
    stop = stop or threading.Event()
    begun = time.perf_counter()
    deadline = begun + duration_s if duration_s is not None else float("inf")
    cpu_before = time.process_time()

    def worker(slot: int) -> None:
        conn = None
        mine = samples[slot]

        def send(body: bytes, content_type: str, key: str | None) -> tuple[int, str | None, bytes]:
            nonlocal conn
            sent_headers = {"Content-Type": content_type, **(headers or {})}
            if key:
                sent_headers["Authorization"] = key
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
                conn.request("POST", path, body=body, headers=sent_headers)
                reply = conn.getresponse()
                text = reply.read()
                if reply.will_close:
                    conn.close()
                    conn = None
                return reply.status, reply.getheader("X-Model-Version"), text
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                return 0, None, b""

        while not stop.is_set():
            ticket = next(tickets)
            if (requests is not None and ticket >= requests) or time.perf_counter() >= deadline:
                break
            body, content_type = payloads[ticket % len(payloads)]
            sent_at = time.perf_counter()
            key = auth.header if auth is not None else None
            status, version, text = send(body, content_type, key)
            if auth is not None and key_refused(status, text):
                fresh = auth.renewed(key)
                if fresh:
                    retried[slot] += 1
                    status, version, _ = send(body, content_type, fresh)
            mine.append(Sample(sent_at - begun, (time.perf_counter() - sent_at) * 1000, status,
                               version))
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    if progress is not None:
        _report_progress(threads, samples, begun, duration_s, requests, progress)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begun
    flat = sorted((s for slot in samples for s in slot), key=lambda s: s.start_s)
    statuses = Counter(s.status for s in flat)
    return LoadResult(
        url=url, concurrency=concurrency, duration_s=elapsed, sent=len(flat),
        ok=sum(n for code, n in statuses.items() if 200 <= code < 300),
        errors={code: n for code, n in statuses.items() if code and not 200 <= code < 300},
        lost=statuses.get(0, 0), generator_cpu_s=time.process_time() - cpu_before, samples=flat,
        retried=sum(retried), key_renewals=auth.renewals if auth else 0,
        key_error=auth.error if auth else None)


def _report_progress(threads, samples, begun, duration_s, requests, progress) -> None:
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        elapsed = time.perf_counter() - begun
        if int(elapsed * 2) % 4:  # every 2 s
            continue
        done = sum(len(s) for s in samples)
        goal = f"{done}/{requests} requests" if requests else \
            f"{done} requests, {elapsed:.0f}/{duration_s:.0f} s"
        progress(f"{goal}, {done / elapsed:.1f} req/s")


def write_outputs(result: LoadResult, out_dir: Path, stem: str) -> dict[str, str]:
    """Summary as Markdown and CSV, every request as CSV, and a PNG latency chart."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    base = out_dir / stem
    files = {"markdown": f"{base}.md", "csv": f"{base}.csv", "png": f"{base}.png"}
    if result.samples:  # the Python engine records every request
        files["requests_csv"] = f"{base}-requests.csv"
        with open(files["requests_csv"], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["start_s", "latency_ms", "status"])
            writer.writerows((f"{s.start_s:.4f}", f"{s.latency_ms:.3f}", s.status)
                             for s in result.samples)
    with open(f"{base}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(summary))
        writer.writerow([summary[k] if not isinstance(summary[k], dict) else
                         ";".join(f"{c}={n}" for c, n in summary[k].items()) for k in summary])
    Path(f"{base}.md").write_text(markdown(summary))
    _chart(result, Path(f"{base}.png"))
    return files


def markdown(summary: dict[str, Any]) -> str:
    errors = ", ".join(f"{c}: {n}" for c, n in summary["errors"].items()) or "none"
    return "\n".join([
        f"# Load on {summary['url']}", "",
        "| clients | duration s | sent | ok | errors | lost | req/s | p50 ms | p90 ms | p99 ms | "
        "generator CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {summary['concurrency']} | {summary['duration_s']} | {summary['sent']} | {summary['ok']} "
        f"| {errors} | {summary['lost']} | {summary['throughput']} | {summary['p50_ms']} | "
        f"{summary['p90_ms']} | {summary['p99_ms']} | {summary['generator_cpu_share']:.1%} of a core |",
        ""])


def _chart(result: LoadResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary()
    if not result.samples:  # wrk: percentiles only
        fig, axis = plt.subplots(figsize=(6, 4))
        names = ["p50", "p90", "p99"]
        axis.bar(names, [summary[f"{n}_ms"] for n in names], color="#4C72B0")
        axis.set_ylabel("latency (ms)")
        fig.suptitle(f"{summary['throughput']} req/s with {result.concurrency} clients (wrk)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    good = [s for s in result.samples if 200 <= s.status < 300]
    bad = [s for s in result.samples if not 200 <= s.status < 300]
    left.scatter([s.start_s for s in good], [s.latency_ms for s in good], s=3, label="2xx")
    if bad:
        left.scatter([s.start_s for s in bad], [s.latency_ms for s in bad], s=6, c="red",
                     label="error / lost")
    left.set_xlabel("time (s)")
    left.set_ylabel("latency (ms)")
    left.legend(loc="upper right")
    left.set_title("latency over the run")
    lat = np.sort([s.latency_ms for s in good])
    if lat.size:
        right.plot(lat, np.arange(1, lat.size + 1) / lat.size)
        for q in (50, 90, 99):
            right.axvline(np.percentile(lat, q), ls=":", c="grey")
            right.annotate(f"p{q}", (np.percentile(lat, q), 0.05), fontsize=8)
    right.set_xlabel("latency (ms)")
    right.set_title("latency distribution (CDF)")
    fig.suptitle(f"{summary['throughput']} req/s with {result.concurrency} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
