"""servetool's model metrics, through TorchServe's custom metrics API, per model and version.

TorchServe drops a handler's metrics unless its metrics configuration declares them
(`model_metrics` of the yaml `metrics_config` names); servetool renders that file from
`declaration()` below, so the names here and there cannot drift apart. The frontend turns them into
Prometheus series on the metrics port. Histograms are in seconds (Prometheus' default buckets,
5 ms to 10 s, which is what TorchServe's frontend gives a histogram).

Emitted once per batch by the handler (a few lines on the worker's stdout, which the frontend
parses): the time of preprocess, inference and postprocess for the batch, its size, and one count
per request by status class, and per bad request by its error type.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

DIMENSIONS = ["ModelName", "ModelVersion", "Level"]
HISTOGRAMS = {
    "servetool_preprocess_seconds": "s",
    "servetool_inference_seconds": "s",
    "servetool_postprocess_seconds": "s",
    "servetool_batch_size": "count",
}
COUNTERS = {"servetool_requests_total": ["Status"], "servetool_bad_requests_total": ["Reason"]}
STEPS = ("preprocess", "inference", "postprocess")


def declaration() -> dict[str, list[dict[str, Any]]]:
    """The `model_metrics` entries TorchServe needs to keep these metrics."""
    return {
        "histogram": [{"name": name, "unit": unit, "dimensions": list(DIMENSIONS)}
                      for name, unit in HISTOGRAMS.items()],
        "counter": [{"name": name, "unit": "count", "dimensions": [*DIMENSIONS, *extra]}
                    for name, extra in COUNTERS.items()],
    }


class BatchMetrics:
    """Records one batch; never fails a request (a metrics problem is logged once and turns them
    off). SERVETOOL_HANDLER_METRICS=0 in the server's environment turns them off too."""

    def __init__(self, model: str, version: str) -> None:
        self.base = [model, version or "unknown", "Model"]
        self.broken = os.environ.get("SERVETOOL_HANDLER_METRICS", "1") == "0"

    def record(self, metrics: Any, seconds: dict[str, float], size: int,
               statuses: list[int], reasons: list[str]) -> None:
        if metrics is None or self.broken:
            return
        try:
            histogram, counter = _kinds()
            for step in STEPS:
                metrics.get_metric(f"servetool_{step}_seconds", histogram) \
                    .add_or_update(seconds[step], self.base)
            metrics.get_metric("servetool_batch_size", histogram) \
                .add_or_update(size, self.base)
            counts: dict[str, int] = {}
            for status in statuses:
                key = f"{status // 100}xx"
                counts[key] = counts.get(key, 0) + 1
            requests = metrics.get_metric("servetool_requests_total", counter)
            for key, n in counts.items():
                requests.add_or_update(n, [*self.base, key])
            bad = metrics.get_metric("servetool_bad_requests_total", counter)
            for reason in reasons:
                bad.add_or_update(1, [*self.base, reason])
        except Exception:  # noqa: BLE001 (an undeclared metric, an old TorchServe: answers go on)
            self.broken = True
            logger.warning("servetool's model metrics are off for this worker", exc_info=True)


def _kinds() -> tuple[Any, Any]:
    """TorchServe's metric types; another engine's metrics object (servetool/engines/kserve) takes
    the names, since it has no `ts` package to import them from."""
    try:
        from ts.metrics.metric_type_enum import MetricTypes
    except ImportError:
        return "histogram", "counter"
    return MetricTypes.HISTOGRAM, MetricTypes.COUNTER
