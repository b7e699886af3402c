"""A Grafana dashboard for a servetool deployment, built with Grafana's own Python SDK
(grafana-foundation-sdk: types generated from Grafana's dashboard schema), with the file
provisioning Grafana reads at start.

Panels, per version of the model chosen in the `model` variable: throughput, error ratio, p50 and
p99 of inference, mean inference time (exact, where the histogram buckets are coarse), bad requests
by reason; and where `deploy --split` fronts the server, the p50 and p99 of each request as the
client sees it (servetool's histograms at the split), the canary weight set, and the share the
split observed (HAProxy's route counts). The same PromQL as `servetool monitor --model` prints
(servetool/operate/monitor.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from servetool.operate.monitor import QUERIES

DATASOURCE_UID = "servetool-prometheus"
DASHBOARD_UID = "servetool-models"
WINDOW = "$__rate_interval"
MODEL = "$model"

# title, unit, expression (per version), legend
PANELS: list[tuple[str, str, str, str]] = [
    ("Throughput", "reqps", QUERIES["requests_per_s"], "{{ModelVersion}}"),
    ("Error ratio", "percentunit", QUERIES["error_ratio"], "{{ModelVersion}}"),
    ("Inference p50", "s", QUERIES["inference_p50_s"], "{{ModelVersion}}"),
    ("Inference p99", "s", QUERIES["inference_p99_s"], "{{ModelVersion}}"),
    ("Inference mean", "s",
     'sum by (ModelVersion) (rate(servetool_inference_seconds_sum{{ModelName="{model}"}}[{window}]))'
     ' / sum by (ModelVersion) (rate(servetool_inference_seconds_count{{ModelName="{model}"}}'
     '[{window}]))', "{{ModelVersion}}"),
    ("Bad requests by reason", "reqps", QUERIES["bad_requests_per_s"],
     "{{ModelVersion}} {{Reason}}"),
    ("Request p50 at the split (as the client sees it)", "s", QUERIES["request_p50_s"],
     "{{version}}"),
    ("Request p99 at the split (as the client sees it)", "s", QUERIES["request_p99_s"],
     "{{version}}"),
    ("Canary weight (set)", "percent", QUERIES["canary_weight"], "to {{version}}"),
    ("Canary share (observed at the split)", "percentunit",
     'sum(rate(haproxy_backend_http_requests_total{{proxy="canary"}}[{window}])) / '
     'sum(rate(haproxy_backend_http_requests_total{{proxy=~"default|canary"}}[{window}]))',
     "to the candidate"),
]


def expressions(model: str = MODEL, window: str = WINDOW) -> dict[str, str]:
    return {title: expr.format(model=model, window=window) for title, _, expr, _ in PANELS}


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    source = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
    board = (dashboard.Dashboard("servetool: models, versions and canaries")
             .uid(DASHBOARD_UID).tags(["servetool", "torchserve"]).refresh("5s")
             .time("now-30m", "now")
             .with_variable(dashboard.QueryVariable("model").label("Model").datasource(source)
                            .query("label_values(servetool_requests_total, ModelName)")))
    for title, unit, _, legend in PANELS:
        expr = expressions()[title]
        board = board.with_panel(
            timeseries.Panel().title(title).unit(unit).datasource(source).height(8).span(12)
            .with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id("A")
                         .range()))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def provisioning(prometheus_url: str, folder: Path) -> dict[str, str]:
    """Grafana's file provisioning in `folder`: the Prometheus data source, a dashboard provider,
    and the dashboard; start Grafana with `paths.provisioning` pointing at folder/provisioning."""
    import yaml

    dashboards = folder / "dashboards"
    sources = folder / "provisioning" / "datasources"
    providers = folder / "provisioning" / "dashboards"
    for path in (dashboards, sources, providers):
        path.mkdir(parents=True, exist_ok=True)
    board = dashboards / "servetool.json"
    board.write_text(json.dumps(build(), indent=2) + "\n")
    (sources / "servetool.yaml").write_text(yaml.safe_dump({"apiVersion": 1, "datasources": [
        {"name": "servetool Prometheus", "type": "prometheus", "uid": DATASOURCE_UID,
         "access": "proxy", "url": prometheus_url, "isDefault": False}]}, sort_keys=False))
    (providers / "servetool.yaml").write_text(yaml.safe_dump({"apiVersion": 1, "providers": [
        {"name": "servetool", "type": "file", "disableDeletion": False,
         "options": {"path": str(dashboards.resolve())}}]}, sort_keys=False))
    return {"dashboard": str(board), "provisioning": str(folder / "provisioning")}
