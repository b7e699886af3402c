"""Commands that change which model version serves: versions, promote, rollback, watch."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import click

from servetool.cli.common import (
    check_model_args,
    emit,
    friendly_errors,
    json_option,
    kube_options,
    kube_target,
    main,
    make_target,
    progress,
    require_name,
    server_options,
)
from servetool.errors import ServetoolError

keep_option = click.option(
    "--keep", type=click.IntRange(min=1), default=None,
    help="How many of the latest defaults stay loaded, so a rollback is instant [default: the "
         "model's policy, 2 unless set].")


def _lifecycle(run_dir: Path, model_store: Path, target: str):
    from servetool.operate.lifecycle import Lifecycle

    return Lifecycle(make_target(run_dir, model_store, target))


@main.command()
@click.argument("model")
@server_options
@json_option
@friendly_errors
def versions(model: str, run_dir: Path, model_store: Path, target: str, as_json: bool) -> None:
    """List MODEL's versions: which is the default, workers, when loaded, archive digest; and
    those the watcher could not serve, with why and when it tries again."""
    from servetool.operate import watch as watching
    from servetool.targets.common import DeployError

    check_model_args(model, None)
    life = _lifecycle(run_dir, model_store, target)
    watcher = watching.describe(life.run_dir) or {}
    waiting = [{k: v for k, v in entry.items() if k not in ("model", "retry_at_s")}
               for entry in watcher.get("failed", []) + watcher.get("refused", [])
               if entry.get("model") == model]
    try:
        rows = life.versions(model)
    except DeployError:
        if not waiting:  # a model whose only versions failed in the watcher is still shown
            raise
        rows = []
    lines = [f"{'VERSION':<12} {'DEFAULT':<8} {'WORKERS':<10} {'LOADED AT':<26} DIGEST"]
    for r in rows:
        ready = sum(w["status"] == "READY" for w in r["workers"])
        workers = f"{ready}/{len(r['workers'])} ready" if r["loaded"] else "not loaded"
        lines.append(f"{r['version']:<12} {'yes' if r['default'] else '':<8} {workers:<10} "
                     f"{r['loaded_at'] or '-':<26} {(r['digest'] or '-')[:12]}"
                     + (f"  from {r['source']}" if r["source"] else ""))
    if waiting:
        lines.append(f"Published to {watcher.get('source')}, not serving:")
        for entry in sorted(waiting, key=lambda e: str(e.get("version"))):
            lines.append(f"{entry['version']:<12} {watching.retry_text(entry)}; last tried "
                         f"{entry['at']}: {entry['detail']}")
    emit({"model": model, "versions": rows, "watcher": waiting}, as_json, "\n".join(lines))


@main.command()
@click.argument("model")
@click.argument("version")
@keep_option
@server_options
@json_option
@friendly_errors
def promote(model: str, version: str, keep: int | None, run_dir: Path, model_store: Path,
            target: str, as_json: bool) -> None:
    """Make VERSION of MODEL the default, after a smoke test on its own URL."""
    check_model_args(model, version)
    life = _lifecycle(run_dir, model_store, target)
    if keep is not None:
        life.set_keep(model, keep)
    result = life.promote(model, version)
    emit(result, as_json, f"{model}: {version} is the default")


@main.command()
@click.argument("model")
@click.option("--to", "to_version", default=None,
              help="The version to go back to [default: the previous default].")
@server_options
@json_option
@friendly_errors
def rollback(model: str, to_version: str | None, run_dir: Path, model_store: Path, target: str,
             as_json: bool) -> None:
    """Make MODEL's previous default the default again (it stayed loaded: no cold start)."""
    check_model_args(model, to_version)
    result = _lifecycle(run_dir, model_store, target).rollback(model, to_version)
    emit(result, as_json, f"{model}: {result['default']} is the default (was {result['previous']})")


def watch_options(prefix: str = ""):
    """The watcher's options; `deploy` names them --watch-* beside its own (--metrics-port)."""
    def decorate(func):
        options = [
            click.option(f"--{prefix}endpoint-url", "endpoint_url",
                         envvar="SERVETOOL_S3_ENDPOINT_URL", default=None,
                         help="s3: the S3-compatible store's URL when it is not AWS (credentials "
                              "come from boto3's usual chain: AWS_* variables, ~/.aws, roles)."),
            click.option(f"--{prefix}interval", "interval_s", type=click.FloatRange(min=0.2),
                         default=None, help="Seconds between listings of the source [default: 2 "
                                            "for a folder, 10 for a bucket]."),
            click.option(f"--{prefix}metrics-port", "watch_metrics_port",
                         type=click.IntRange(min=0, max=65535), default=None,
                         help="Serve the watcher's Prometheus metrics on 127.0.0.1:PORT (0: none) "
                              "[default: 8090 in the background, none in the foreground]."),
        ]
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


@main.command()
@click.argument("source")
@watch_options()
@keep_option
@click.option("--once", is_flag=True, help="Check once, print what happened, and exit.")
@click.option("--background", is_flag=True,
              help="Leave a watcher running after this command (`servetool stop` ends it).")
@server_options
@json_option
@friendly_errors
def watch(source: str, endpoint_url: str | None, interval_s: float | None,
          watch_metrics_port: int | None, keep: int | None, once: bool, background: bool, run_dir: Path,
          model_store: Path, target: str, as_json: bool) -> None:
    """Serve new versions published to SOURCE: a folder or s3://BUCKET/PREFIX.

    \b
    Layout: SOURCE/MODEL/VERSION/ holding one .mar, or a servetool model folder (packaged here,
    gate and pre-flight included), and a READY file written last (optionally {"sha256": ...} of
    the .mar). Each new version is registered, smoke-tested on its own URL, made the default, and
    versions beyond --keep are unloaded; one that fails never takes traffic. A temporary failure
    (a full disk, the bucket or TorchServe unreachable, throttling) is retried with a backoff
    (30 s doubling to 15 min, 8 attempts); any failed version is tried again when it is published
    again, the same bytes too. Symbolic links in SOURCE are refused. `servetool versions MODEL`
    shows why a version failed and when it is retried. Runs in the foreground until Ctrl-C.
    """
    from servetool.operate import watch as watching

    tgt = make_target(run_dir, model_store, target)
    tgt.require_running()
    if background:
        pid = watching.launch(tgt, source, endpoint_url=endpoint_url, interval_s=interval_s,
                              keep=keep, metrics_port=watching.DEFAULT_METRICS_PORT
                              if watch_metrics_port is None else watch_metrics_port)
        emit({"watcher_pid": pid, "source": source}, as_json,
             f"watching {source} in the background (pid {pid}); `servetool status` shows it")
        return
    if watching.daemon(Path(tgt.opts.run_dir)).pid() is not None:
        raise ServetoolError("a background watcher already serves this deployment (`servetool "
                             "status`); `servetool stop` ends it with the server")
    watcher = watching.Watcher(tgt, watching.open_source(source, endpoint_url),
                               interval_s=interval_s, keep=keep,
                               metrics_port=watch_metrics_port, say=progress)
    if once:
        events = watcher.check_once()
        summary: dict[str, Any] = {"source": watcher.source.url, "events": events,
                                   "last_error": watcher.state["last_error"]}
        lines = [f"{e['model']} {e['version']}: {e['outcome']}: {e['detail']}" for e in events]
        emit(summary, as_json, "\n".join(lines) or (watcher.state["last_error"] or "nothing new"))
        if watcher.state["last_error"] or any(e["outcome"] == "failed" for e in events):
            raise SystemExit(1)
        return
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        watcher.run(lambda: bool(stop))
    except KeyboardInterrupt:
        pass
    progress("watcher stopped")


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give percentages like 10,25,50,100") from None
    if not steps or steps[-1] != 100 or any(not 0 < s <= 100 for s in steps) or \
            list(steps) != sorted(steps):
        raise click.BadParameter(f"{text!r}: rising percentages that end at 100")
    return steps


@main.command()
@click.argument("model")
@click.argument("version", required=False)
@click.option("--weight", type=click.IntRange(0, 100), default=None,
              help="Send this percentage of MODEL's traffic to VERSION (0: none), and stay there.")
@click.option("--auto", "auto", is_flag=True,
              help="Step the weight up while VERSION behaves like the default; promote it at the "
                   "end, or roll back at the first breach (runs in the foreground).")
@click.option("--steps", default="10,25,50,100", show_default=True,
              help="--auto: the weights, in percent, ending at 100.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=1), default=30.0,
              show_default=True, help="--auto: seconds of each judgement window.")
@click.option("--max-error-increase", type=click.FloatRange(min=0), default=0.01,
              show_default=True, help="--auto: how much the candidate's error ratio may exceed "
                                      "the default's (0.01 = one point).")
@click.option("--max-p99-ratio", type=click.FloatRange(min=1), default=1.5, show_default=True,
              help="--auto: the candidate's p99 inference time over the default's, at most.")
@click.option("--min-requests", type=click.IntRange(min=1), default=50, show_default=True,
              help="--auto: requests the candidate must answer in a step before it is judged.")
@click.option("--abort", is_flag=True, help="Send MODEL's traffic back to the default.")
@server_options
@kube_options
@json_option
@friendly_errors
def canary(model: str, version: str | None, weight: int | None, auto: bool, steps: str,
           interval_s: float, max_error_increase: float, max_p99_ratio: float, min_requests: int,
           abort: bool, run_dir: Path, model_store: Path, target: str, kubeconfig: Path | None,
           kube_context: str | None, namespace: str, deployment_name: str | None,
           manifests_dir: Path, as_json: bool) -> None:
    """Release VERSION of MODEL to a share of its traffic (`deploy --split` puts HAProxy in front
    of TorchServe for this). Requests that name a version are never split. Without VERSION:
    where MODEL's canary stands.

    On kubernetes (--name): --weight and --abort write the canary ConfigMap every pod's split
    follows; --auto is not offered there (its judgement needs every pod's figures together:
    watch them in Prometheus and step by hand)."""
    from servetool.operate.canary import Bounds, Canary, read_state

    check_model_args(model, version)
    if target == "kubernetes":
        _kube_canary(model, version, weight, auto, abort,
                     kube_target(kubeconfig, kube_context, manifests_dir), namespace,
                     require_name(deployment_name), as_json)
        return
    tgt = make_target(run_dir, model_store, target)
    if not (abort or auto or weight is not None):
        state = read_state(Path(tgt.require_running().run_dir))
        if not state or state.get("model") != model:
            raise ServetoolError(f"no canary of {model} (start one: servetool canary {model} "
                                 "VERSION --weight 10 | --auto)")
        emit(state, as_json, f"{model}: {state['weight']}% to {state['candidate']}, "
             f"{state['status']}" + (f": {state['reason']}" if state.get("reason") else ""))
        return
    ctl = Canary(tgt, progress)
    if abort:
        result = ctl.abort(model)
    elif version is None:
        raise ServetoolError("give the VERSION to send traffic to")
    elif auto:
        # kill (SIGTERM: a job's timeout, systemd) and a closed terminal (SIGHUP) stop it as
        # Ctrl-C does: the weight back to 0 before it exits, instead of an orphaned canary
        stop: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _: stop.append(signum))
        result = ctl.run(model, version, _steps(steps), interval_s,
                         Bounds(max_error_increase, max_p99_ratio, min_requests),
                         stopping=lambda: bool(stop))
    else:
        result = ctl.set_weight(model, version, weight)
    emit(result, as_json, f"{model}: {result['weight']}% to {result['candidate']}, "
         f"{result['status']}" + (f": {result['reason']}" if result.get("reason") else ""))
    if result["status"] == "rolled_back":
        raise SystemExit(1)


def _kube_canary(model: str, version: str | None, weight: int | None, auto: bool, abort: bool,
                 kube: Any, namespace: str, name: str, as_json: bool) -> None:
    if auto:
        raise ServetoolError("--auto judges one server's figures; on kubernetes set the weight "
                             "by hand (--weight) and watch the per-version panels in Grafana")
    if abort:
        weight = 0
    elif version is None or weight is None:
        raise ServetoolError("on kubernetes give VERSION and --weight (or --abort)")
    result = kube.set_canary(namespace, name, model, version, weight)
    emit(result, as_json, f"{model}: {weight}% to {result['candidate']} in every pod of {name} "
         f"(ConfigMap {result['config_map']}; pods apply it once their mount updates)")
