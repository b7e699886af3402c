"""Monitoring a deployment: a Prometheus scrape configuration for it, and the queries that read
servetool's metrics back (per model and version).

What is scraped: TorchServe's metrics port (its own metrics, and the handler's servetool_* metrics
of handlers/metrics.py, which the frontend serves), the split's port when `deploy --split` put
HAProxy in front (HAProxy's exporter at /metrics, servetool's request histograms and canary
weights at /servetool/metrics), and the watcher's port when one runs. The
labels servetool adds (`deployment`, `target`) tell deployments apart in one Prometheus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from servetool.engines.torchserve.split import EXPORTER_PATH
from servetool.operate import watch

# PromQL over servetool's handler metrics, per version of MODEL (WINDOW: a range like 1m).
QUERIES = {
    "requests_per_s": 'sum by (ModelVersion) (rate(servetool_requests_total{{ModelName="{model}"}}'
                      '[{window}]))',
    # a version without any error has no non-2xx series: `or ... * 0` makes its ratio 0, not absent
    "error_ratio": '(sum by (ModelVersion) (rate(servetool_requests_total{{ModelName="{model}",'
                   'Status!="2xx"}}[{window}])) or sum by (ModelVersion) (rate('
                   'servetool_requests_total{{ModelName="{model}"}}[{window}])) * 0) / '
                   'sum by (ModelVersion) (rate(servetool_requests_total{{ModelName="{model}"}}'
                   '[{window}]))',
    "inference_p50_s": 'histogram_quantile(0.5, sum by (le, ModelVersion) (rate('
                       'servetool_inference_seconds_bucket{{ModelName="{model}"}}[{window}])))',
    "inference_p99_s": 'histogram_quantile(0.99, sum by (le, ModelVersion) (rate('
                       'servetool_inference_seconds_bucket{{ModelName="{model}"}}[{window}])))',
    # at the split (deploy --split): the time each prediction took as the client sees it
    "request_p50_s": 'histogram_quantile(0.5, sum by (le, version) (rate('
                     'servetool_request_seconds_bucket{{model="{model}"}}[{window}])))',
    "request_p99_s": 'histogram_quantile(0.99, sum by (le, version) (rate('
                     'servetool_request_seconds_bucket{{model="{model}"}}[{window}])))',
    "canary_weight": 'max by (version) (servetool_canary_weight{{model="{model}"}})',
    "bad_requests_per_s": 'sum by (ModelVersion, Reason) (rate(servetool_bad_requests_total{{'
                          'ModelName="{model}"}}[{window}]))',
}


def scrape_targets(status: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """job -> host:port[/path] of what a running deployment exposes (path: /metrics if none)."""
    targets = {"torchserve": urlsplit(status["endpoints"]["metrics"]).netloc}
    if status["endpoints"].get("split_metrics"):
        address = urlsplit(status["endpoints"]["split_metrics"]).netloc
        targets["haproxy"] = address
        targets["servetool-split"] = address + EXPORTER_PATH
    watcher = watch.describe(run_dir.resolve())
    if watcher and watcher.get("running") and watcher.get("metrics"):
        targets["servetool-watch"] = urlsplit(watcher["metrics"]).netloc
    return targets


def prometheus_config(targets: dict[str, str], deployment: str, target: str,
                      interval_s: float = 5.0) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/" + (where.split("/", 1)[1:] or ["metrics"])[0],
             "static_configs": [{"targets": [where.split("/", 1)[0]],
                                 "labels": {"deployment": deployment, "target": target}}]}
            for job, where in targets.items()],
    }


def write_prometheus_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Rendered by `servetool monitor`: scrape this deployment's metrics.\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def queries(model: str, window: str = "1m") -> dict[str, str]:
    return {name: q.format(model=model, window=window) for name, q in QUERIES.items()}
