"""Commands that watch a deployment: monitor (Prometheus scrape configuration and queries)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from servetool.cli.common import (
    check_model_args,
    emit,
    friendly_errors,
    json_option,
    main,
    make_target,
    server_options,
)
from servetool.errors import ServetoolError


@main.command()
@click.option("--prometheus-config", "prometheus_file", type=click.Path(path_type=Path),
              default=None, help="Write a Prometheus scrape configuration for this deployment.")
@click.option("--scrape-interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="Seconds between scrapes in the written configuration.")
@click.option("--model", default=None, help="Print the PromQL that reads MODEL's figures per version.")
@click.option("--grafana", "grafana_dir", type=click.Path(path_type=Path), default=None,
              help="Write a Grafana dashboard and its file provisioning into this folder.")
@click.option("--prometheus-url", default="http://127.0.0.1:9090", show_default=True,
              help="--grafana: where Grafana reaches the Prometheus that scrapes this deployment.")
@server_options
@json_option
@friendly_errors
def monitor(prometheus_file: Path | None, scrape_interval: float, model: str | None,
            grafana_dir: Path | None, prometheus_url: str, run_dir: Path, model_store: Path,
            target: str, as_json: bool) -> None:
    """Monitoring for a running deployment: its Prometheus scrape targets (TorchServe's metrics
    port with servetool's per-version handler metrics, the watcher's), a configuration for them,
    and the queries for request rate, error ratio, p50/p99 and bad requests per version."""
    from servetool.operate import monitor as monitoring

    tgt = make_target(run_dir, model_store, target)
    status = tgt.status()
    if not status["running"]:
        raise ServetoolError(f"no {target} deployment is running from {run_dir}: `servetool "
                             "deploy` first")
    targets = monitoring.scrape_targets(status, Path(tgt.opts.run_dir))
    config = monitoring.prometheus_config(targets, str(Path(tgt.opts.run_dir).resolve()), target,
                                          scrape_interval)
    result: dict[str, Any] = {"targets": targets, "prometheus": config}
    lines = [f"scrape {job}: {address}/metrics" for job, address in targets.items()]
    if prometheus_file:
        monitoring.write_prometheus_config(prometheus_file, config)
        result["prometheus_config"] = str(prometheus_file)
        lines.append(f"wrote {prometheus_file}: prometheus --config.file={prometheus_file}")
    if grafana_dir:
        from servetool.operate.dashboard import provisioning

        result["grafana"] = provisioning(prometheus_url, grafana_dir)
        lines.append(f"wrote the dashboard {result['grafana']['dashboard']}; Grafana reads "
                     f"{result['grafana']['provisioning']} as its provisioning folder")
    if model:
        check_model_args(model, None)
        result["queries"] = monitoring.queries(model)
        lines += [f"{name}: {query}" for name, query in result["queries"].items()]
    emit(result, as_json, "\n".join(lines))


@main.command()
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.5), default=2.0,
              show_default=True, help="Seconds between refreshes (and the window of each figure).")
@click.option("--once", is_flag=True, help="One window, printed once (with --json: for scripts).")
@server_options
@json_option
@friendly_errors
def top(interval_s: float, once: bool, run_dir: Path, model_store: Path, target: str,
        as_json: bool) -> None:
    """A live view per model and version: requests/s, error ratio, p50/p99 of inference, mean
    batch, handler time and READY workers (`*` marks the default). Ctrl-C ends it."""
    from rich.console import Console
    from rich.live import Live

    from servetool.operate import top as view

    tgt = make_target(run_dir, model_store, target)
    status = tgt.status()
    if not status["running"]:
        raise ServetoolError(f"no {target} deployment is running from {run_dir}: `servetool "
                             "deploy` first")
    url = status["endpoints"]["metrics"]
    title = f"servetool top: {url} (every {interval_s:g} s; * = default)"
    if once:
        rows, _, now = view.sample(url, tgt.status, interval_s)
        if as_json:
            emit({"interval_s": interval_s, "rows": rows, "canary": now.get("canary")}, True, "")
        else:
            Console().print(view.table(rows, title + view.canary_line(now)))
        return
    before = view.read_metrics(url)
    try:
        with Live(view.table([], title), refresh_per_second=4) as live:
            while True:
                rows, before, now = view.sample(url, tgt.status, interval_s, before)
                live.update(view.table(rows, title + view.canary_line(now)))
    except KeyboardInterrupt:
        pass
