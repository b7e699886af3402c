"""A closed-loop HTTP load generator for a served model: `servetool bench serve`.

Each of `concurrency` clients keeps one keep-alive connection and sends the next request as soon as
the last answer arrived. Every request sent is accounted for exactly once: answered 2xx, answered
with an error status, or lost (the connection failed or timed out before any answer). The
generator also reports its own CPU use, because on a small machine a load generator that eats a
core is part of what it measures.

Two engines: Debian's `wrk` (compiled; about a tenth of the Python engine's CPU per request, which
matters for models that answer in a few milliseconds) where it is installed, and a Python one
(threads with http.client) that also records every request and can send an exact count.
"""

from __future__ import annotations

import http.client
import itertools
import json
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

Payload = tuple[bytes, str]  # body, content type
CONTENT_TYPES = {".json": "application/json"}


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


def run_wrk(url: str, files: list[Path], *, concurrency: int = 8, duration_s: float = 20.0,
            headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> LoadResult:
    """The same closed loop, driven by wrk (one thread is plenty at these rates)."""
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    # The key goes through the environment (readable by this user only), never the command line,
    # which every local user can read with `ps`.
    env = {**os.environ, "SERVETOOL_WRK_AUTH": (headers or {}).get("Authorization", "")}
    args = [item for f in files for item in (str(f.resolve()), content_type(f))]
    cmd = [wrk, "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration_s))}s",
           "--timeout", f"{max(1, round(timeout_s))}s", "-s", str(WRK_SCRIPT), url, "--", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=duration_s + timeout_s + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SERVETOOL_WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    report = json.loads(line.split(" ", 1)[1])
    statuses = {int(k): v for k, v in report["statuses"].items()}
    lost = report["connect"] + report["read"] + report["write"] + report["timeout"]
    return LoadResult(
        url=url, concurrency=concurrency, duration_s=report["duration_us"] / 1e6,
        sent=report["requests"] + lost,
        ok=sum(n for code, n in statuses.items() if 200 <= code < 300),
        errors={code: n for code, n in statuses.items() if not 200 <= code < 300}, lost=lost,
        generator_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        engine="wrk",
        reported_latency_ms={"p50_ms": report["p50_us"] / 1000, "p90_ms": report["p90_us"] / 1000,
                             "p99_ms": report["p99_us"] / 1000,
                             "mean_ms": round(report["mean_us"] / 1000, 2)})


def run_load(url: str, payloads: list[Payload], *, concurrency: int = 8,
             duration_s: float | None = 20.0, requests: int | None = None,
             headers: dict[str, str] | None = None, timeout_s: float = 30.0,
             progress: Callable[[str], None] | None = None,
             stop: threading.Event | None = None) -> LoadResult:
    """Drive `url` with POSTs until `requests` are sent, `duration_s` has passed or `stop` is set
    (a steady load behind something else being measured)."""
    if requests is None and duration_s is None and stop is None:
        raise ValueError("give a request count, a duration or a stop event")
    parts = urlsplit(url)
    path = parts.path or "/"
    tickets = itertools.count()
    samples: list[list[Sample]] = [[] for _ in range(concurrency)]
    stop = stop or threading.Event()
    begun = time.perf_counter()
    deadline = begun + duration_s if duration_s is not None else float("inf")
    cpu_before = time.process_time()

    def worker(slot: int) -> None:
        conn = None
        mine = samples[slot]
        while not stop.is_set():
            ticket = next(tickets)
            if (requests is not None and ticket >= requests) or time.perf_counter() >= deadline:
                break
            body, content_type = payloads[ticket % len(payloads)]
            sent_at = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
                conn.request("POST", path, body=body,
                             headers={"Content-Type": content_type, **(headers or {})})
                reply = conn.getresponse()
                reply.read()
                status, version = reply.status, reply.getheader("X-Model-Version")
                if reply.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status, version = 0, None
                if conn is not None:
                    conn.close()
                conn = None
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
        lost=statuses.get(0, 0), generator_cpu_s=time.process_time() - cpu_before, samples=flat)


def _report_progress(threads, samples, begun, duration_s, requests, progress) -> None:
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        elapsed = time.perf_counter() - begun
        if int(elapsed * 2) % 4:  # every 2 s
            continue
        done = sum(len(s) for s in samples)
        goal = f"/{requests}" if requests else f", {elapsed:.0f}/{duration_s:.0f} s"
        progress(f"{done}{goal} requests, {done / elapsed:.1f} req/s")


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
