"""`servetool top`: a live terminal view of a deployment, for someone without Grafana.

Every interval it reads TorchServe's metrics port (servetool's handler metrics, handlers/metrics.py)
and the management API (workers), and shows per model and version what changed since the last
read: requests per second, error ratio, p50/p99 of the model's inference and of the whole handler
(from the histograms' bucket counts, interpolated as Prometheus' histogram_quantile does), mean
batch size and READY workers. The text format is parsed with prometheus_client's parser.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import requests

Key = tuple[str, str]  # (model, version)
STEPS = ("preprocess", "inference", "postprocess")


def read_metrics(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """servetool's series from one scrape: counters and histogram buckets per (model, version)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url, timeout=timeout_s).text
    out: dict[str, Any] = {"at": time.monotonic(), "requests": defaultdict(float),
                           "errors": defaultdict(float), "buckets": defaultdict(dict),
                           "sums": defaultdict(float), "counts": defaultdict(float)}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if "ModelName" not in labels:
                continue
            key = (labels["ModelName"], labels.get("ModelVersion", ""))
            name = sample.name
            if name.startswith("servetool_requests_total"):
                out["requests"][key] += sample.value
                if labels.get("Status") != "2xx":
                    out["errors"][key] += sample.value
            elif name.endswith("_bucket") and name.startswith("servetool_"):
                metric = name[len("servetool_"):-len("_bucket")]
                out["buckets"][(key, metric)][float(labels["le"])] = sample.value
            elif name.startswith("servetool_") and name.endswith(("_sum", "_count")):
                metric, _, part = name[len("servetool_"):].rpartition("_")
                out["sums" if part == "sum" else "counts"][(key, metric)] += sample.value
    return out


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The q-quantile of the observations between two reads of a cumulative histogram."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last bucket: its lower edge is all that is known
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return None


def figures(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, version) seen in `after`."""
    seconds = max(after["at"] - before["at"], 1e-9)
    rows = []
    for key in sorted(after["requests"]):
        sent = after["requests"][key] - before["requests"].get(key, 0.0)
        errors = after["errors"].get(key, 0.0) - before["errors"].get(key, 0.0)
        row: dict[str, Any] = {"model": key[0], "version": key[1],
                               "requests_per_s": round(sent / seconds, 2),
                               "error_ratio": round(errors / sent, 4) if sent else None}
        for metric in ("inference_seconds",):
            b = after["buckets"].get((key, metric), {})
            a = before["buckets"].get((key, metric), {})
            for q in (0.5, 0.99):
                value = quantile(q, a, b)
                row[f"inference_p{int(q * 100)}_ms"] = round(value * 1000, 2) \
                    if value is not None else None
        observed = after["counts"].get((key, "inference_seconds"), 0) - \
            before["counts"].get((key, "inference_seconds"), 0)
        spent = after["sums"].get((key, "inference_seconds"), 0) - \
            before["sums"].get((key, "inference_seconds"), 0)
        # exact, where the frontend's fixed buckets (5 ms the first) blur a fast model's p99
        row["inference_mean_ms"] = round(spent / observed * 1000, 3) if observed else None
        batches = after["counts"].get((key, "batch_size"), 0) - \
            before["counts"].get((key, "batch_size"), 0)
        rows_in = after["sums"].get((key, "batch_size"), 0) - \
            before["sums"].get((key, "batch_size"), 0)
        handler = sum(after["sums"].get((key, f"{s}_seconds"), 0) -
                      before["sums"].get((key, f"{s}_seconds"), 0) for s in STEPS)
        row["mean_batch"] = round(rows_in / batches, 2) if batches else None
        row["handler_ms_per_batch"] = round(handler / batches * 1000, 2) if batches else None
        rows.append(row)
    return rows


def with_workers(rows: list[dict[str, Any]], status: dict[str, Any]) -> list[dict[str, Any]]:
    workers = {(m["name"], m["version"]): m for m in status.get("models", []) if not m.get("error")}
    for row in rows:
        m = workers.get((row["model"], row["version"]), {})
        row["default"] = bool(m.get("default"))
        row["workers_ready"] = sum(w["status"] == "READY" for w in m.get("workers", []))
    return rows


def table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    view = Table(title=title, title_justify="left")
    for column in ("model", "version", "req/s", "errors", "p50 ms", "p99 ms", "batch",
                   "handler ms", "workers"):
        view.add_column(column, justify="left" if column in ("model", "version") else "right",
                        no_wrap=True, min_width=len(column))

    def show(value: Any, fmt: str = "{}") -> str:
        return "-" if value is None else fmt.format(value)

    for r in rows:
        view.add_row(r["model"], r["version"] + (" *" if r.get("default") else ""),
                     show(r["requests_per_s"], "{:.1f}"), show(r["error_ratio"], "{:.1%}"),
                     show(r["inference_p50_ms"], "{:.1f}"), show(r["inference_p99_ms"], "{:.1f}"),
                     show(r["mean_batch"], "{:.1f}"), show(r["handler_ms_per_batch"], "{:.1f}"),
                     str(r.get("workers_ready", "-")))
    return view


def sample(metrics_url: str, status: Callable[[], dict[str, Any]], interval_s: float,
           before: dict[str, Any] | None = None
           ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Rows for the next interval, the read to compare the one after with, and the status."""
    before = before or read_metrics(metrics_url)
    time.sleep(interval_s)
    after = read_metrics(metrics_url)
    now = status()
    return with_workers(figures(before, after), now), after, now


def canary_line(status: dict[str, Any]) -> str:
    c = status.get("canary")
    if not c or c.get("status") not in ("running", "manual"):
        return ""
    return f"\ncanary of {c['model']}: {c['weight']}% to {c['candidate']} ({c['status']})"
