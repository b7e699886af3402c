"""The handler's metrics (handlers/metrics.py) as Prometheus series, with the names and labels
TorchServe's metrics port gives them, so the same queries, dashboards and `top` read either
engine."""

from __future__ import annotations

import socket
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from handlers.metrics import COUNTERS, DIMENSIONS, HISTOGRAMS

# TorchServe's frontend adds the host's name to every handler metric.
HOSTNAME = socket.gethostname()


class _Series:
    def __init__(self, metric: Any, histogram: bool) -> None:
        self.metric, self.histogram = metric, histogram

    def add_or_update(self, value: float, dimension_values: list[str]) -> None:
        series = self.metric.labels(*dimension_values, HOSTNAME)
        if self.histogram:
            series.observe(value)
        else:
            series.inc(value)


class HandlerMetrics:
    """What the handler's BatchMetrics calls: get_metric(name, kind).add_or_update(value, dims)."""

    def __init__(self) -> None:
        disable_created_metrics()  # TorchServe's port has no *_created series either
        self.registry = CollectorRegistry()
        self.series: dict[str, _Series] = {}
        for name in HISTOGRAMS:
            self.series[name] = _Series(Histogram(name, name, [*DIMENSIONS, "Hostname"],
                                                  registry=self.registry), True)
        for name, extra in COUNTERS.items():
            self.series[name] = _Series(Counter(name.removesuffix("_total"), name,
                                                [*DIMENSIONS, *extra, "Hostname"],
                                                registry=self.registry), False)

    def get_metric(self, name: str, kind: Any = None) -> _Series:
        return self.series[name]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
