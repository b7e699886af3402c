"""Commands that run and operate a deployment: deploy, image, predict, scale, status, token, stop."""

from __future__ import annotations

import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

import click

from servetool import engines
from servetool.cli.common import (
    TARGETS,
    check_model_args,
    default_config,
    echo_stderr,
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
    server_setting,
    store_options,
)
from servetool.cli.lifecycle import keep_option, watch_options
from servetool.engines.torchserve.management import explain_failure
from servetool.engines.torchserve.process import DEFAULT_PORTS
from servetool.errors import ServetoolError
from servetool.operate import lifecycle

ENGINES = list(engines.NAMES)


@main.command()
@click.argument("models", nargs=-1)
@click.option("--target", type=click.Choice(TARGETS), default="local", show_default=True,
              help="local: an embedded TorchServe on this machine; docker: servetool's image in a "
                   "container; kubernetes: manifests (applied when a kubeconfig is given).")
@store_options
@click.option("--config", "base_config", type=click.Path(path_type=Path), default=None,
              help="Base TorchServe config.properties [default: ./config.properties if present].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (local) or publish on (docker). Anything but loopback "
                   "exposes the APIs to the network.")
@click.option("--engine", type=click.Choice(ENGINES), envvar="SERVETOOL_ENGINE",
              default="torchserve", show_default=True,
              help="torchserve: TorchServe (JVM frontend, Python workers); kserve: the same "
                   "archives in-process behind KServe's protocol stack (no Java; adds the Open "
                   "Inference Protocol v2). Local target only, so far.")
@click.option("--inference-port", type=int, envvar="SERVETOOL_INFERENCE_PORT",
              default=DEFAULT_PORTS["inference"], show_default=True)
@click.option("--management-port", type=int, envvar="SERVETOOL_MANAGEMENT_PORT",
              default=DEFAULT_PORTS["management"], show_default=True)
@click.option("--metrics-port", type=int, envvar="SERVETOOL_METRICS_PORT",
              default=DEFAULT_PORTS["metrics"], show_default=True)
@click.option("--grpc-inference-port", type=int, envvar="SERVETOOL_GRPC_INFERENCE_PORT",
              default=DEFAULT_PORTS["grpc_inference"], show_default=True)
@click.option("--grpc-management-port", type=int, envvar="SERVETOOL_GRPC_MANAGEMENT_PORT",
              default=DEFAULT_PORTS["grpc_management"], show_default=True)
@click.option("--clients-port", type=int, envvar="SERVETOOL_CLIENTS_PORT", default=None,
              help="Local target: the OpenAI (/v1/embeddings, /v1/models) and TEI (/embed, "
                   "/predict, /rerank) paths on this port [default: the inference port + 3, "
                   "8083]; 0 turns them off.")
@click.option("--timeout", type=float, default=300, show_default=True,
              help="Seconds to wait for the server and for each model's workers.")
@click.option("--no-promote", is_flag=True,
              help="Load new versions beside the default without making them the default (for "
                   "`servetool canary` or `promote` later).")
@click.option("--split", "with_split", is_flag=True,
              help="HAProxy on the inference port in front of TorchServe (local, docker: beside "
                   "it; kubernetes: in every pod), so that `servetool canary` can split a "
                   "model's traffic between versions.")
@click.option("--restart-on-crash", is_flag=True,
              help="Bring a crashed server back with every model, version and worker count: "
                   "local: a supervisor process; docker: a restart policy (TorchServe restores "
                   "its last snapshot).")
@click.option("--base-image", default=None,
              help="docker: the image to build on [default: python:3.11-slim-bookworm].")
@click.option("--network", type=click.Choice(["ports", "host"]), default="ports", show_default=True,
              help="docker: publish the APIs on --host (ports) or share the host's network (host).")
@click.option("--mount-models", is_flag=True,
              help="docker: mount the model store read-only instead of baking the archives in.")
@click.option("--mount-config", is_flag=True,
              help="docker: mount the rendered config.properties read-only instead of baking it in "
                   "(a config change then needs a new container, not a new image).")
@click.option("--image-tag", default=None, help="docker: tag for the image [default: from the "
              "model names and a digest of the build context].")
@click.option("--container-name", default="servetool", show_default=True)
@click.option("--cpus", "docker_cpus", type=click.FloatRange(min=0.1), default=None,
              help="docker: CPU limit for the container (auto workers follow it).")
@click.option("--docker-memory", default=None, help="docker: memory limit, e.g. 2g.")
@click.option("--ca-cert", "ca_certs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="docker: a CA certificate pip needs during the build (repeatable) [default: the "
                   "ones in /usr/local/share/ca-certificates]. Used in the build stage only.")
@kube_options
@click.option("--dry-run", is_flag=True, help="kubernetes: render the manifests, apply nothing.")
@click.option("--image", "kube_image", default=None,
              help="kubernetes: the image the pods run [default: the tag --target docker builds "
                   "for these archives]; push it where the cluster can pull it.")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True,
              help="kubernetes: the autoscaler's minimum number of pods (it owns the count).")
@click.option("--max-replicas", type=click.IntRange(min=1), default=5, show_default=True,
              help="kubernetes: the autoscaler's maximum.")
@click.option("--cpu", default="1", show_default=True, help="kubernetes: CPU request per pod.")
@click.option("--memory", default="2Gi", show_default=True,
              help="kubernetes: memory limit per pod (the request is half).")
@click.option("--models-pvc", default=None,
              help="kubernetes: mount this PersistentVolumeClaim as the model store instead of "
                   "using the archives baked into the image.")
@click.option("--no-token-auth", is_flag=True,
              help="kubernetes: serve without any key (no gateway, TorchServe's token auth off).")
@click.option("--watch", "watch_source", default=None, metavar="SOURCE",
              help="Serve new versions published to SOURCE (a folder or s3://BUCKET/PREFIX; see "
                   "`servetool watch --help`): local, docker: a watcher beside the server (docker: "
                   "implies --mount-models); kubernetes: a watcher container in every pod (a "
                   "bucket, and an image built with the watcher).")
@click.option("--watch-secret", default=None,
              help="kubernetes: a Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) "
                   "become the watcher's environment.")
@watch_options("watch-")
@keep_option
@json_option
@friendly_errors
def deploy(models: tuple[str, ...], target: str, run_dir: Path, model_store: Path,
           base_config: Path | None, host: str, engine: str, inference_port: int,
           management_port: int,
           metrics_port: int, grpc_inference_port: int, grpc_management_port: int,
           clients_port: int | None, timeout: float, no_promote: bool, with_split: bool,
           restart_on_crash: bool,
           base_image: str | None, network: str, mount_models: bool,
           mount_config: bool, image_tag: str | None, container_name: str, docker_cpus: float | None,
           docker_memory: str | None, ca_certs: tuple[Path, ...], kubeconfig: Path | None,
           kube_context: str | None, namespace: str,
           deployment_name: str | None, manifests_dir: Path, dry_run: bool, kube_image: str | None,
           replicas: int, max_replicas: int, cpu: str, memory: str, models_pvc: str | None,
           no_token_auth: bool, watch_source: str | None, watch_secret: str | None,
           endpoint_url: str | None,
           interval_s: float | None, watch_metrics_port: int | None, keep: int | None,
           as_json: bool) -> None:
    """Start TorchServe (if not running) and register MODELS (default: every archive).

    MODELS are model names (model_store/NAME.mar) or archive paths. Running it again registers
    only the archives that changed. With --target docker the image is built first (deploy/docker/
    holds its context) and the container replaced when the image changed.
    """
    base_config = base_config or default_config()
    if watch_source and target == "docker":
        mount_models = True  # the watcher adds archives to the store the container reads
    if target == "kubernetes":
        from servetool.targets.kubernetes import KubeRequest, deploy_kubernetes
        from servetool.targets.manifests import WatchSpec

        watching = WatchSpec(watch_source, endpoint_url, watch_secret, interval_s, keep) \
            if watch_source else None

        result = deploy_kubernetes(KubeRequest(
            models=models, model_store=model_store, base_config=base_config, name=deployment_name,
            namespace=namespace, image=kube_image, replicas=replicas, max_replicas=max_replicas,
            cpu=cpu, memory=memory, models_pvc=models_pvc, token_auth=not no_token_auth,
            dry_run=dry_run, timeout_s=timeout, watch=watching, split=with_split,
            engine=engine),
            kube_target(kubeconfig, kube_context, manifests_dir))
        emit(result, as_json, kube_summary(result))
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        echo_stderr(f"warning: listening on {host}: the inference, management and metrics APIs are "
                "reachable from the network (token auth stays on)")
    ports = {"inference": inference_port, "management": management_port, "metrics": metrics_port,
             "grpc_inference": grpc_inference_port, "grpc_management": grpc_management_port}
    docker_opts = None
    if target == "docker":
        from servetool.targets.docker import DockerOptions
        from servetool.targets.image import DEFAULT_BASE_IMAGE, ImageOptions

        docker_opts = DockerOptions(
            ImageOptions(model_store=model_store, base_image=base_image or DEFAULT_BASE_IMAGE,
                         base_config=base_config, bake_models=not mount_models,
                         bake_config=not mount_config, tag=image_tag,
                         ca_certs=list(ca_certs) or None),
            network=network, container_name=container_name, publish_host=host,
            cpus=docker_cpus, memory_limit=docker_memory, restart_on_crash=restart_on_crash)
    default_clients = inference_port + 3 if engine == "torchserve" else None
    local = {"clients_port": default_clients if clients_port is None else clients_port or None} \
        if target == "local" else {}
    tgt = make_target(run_dir, model_store, target, docker_opts, base_config=base_config,
                      host=host, ports=ports, startup_timeout_s=timeout, split=with_split,
                      engine=engine, **local)
    if keep is not None:
        tgt.keep = keep
    tgt.promote = not no_promote
    result = lifecycle.deploy(tgt, models, timeout_s=timeout)
    if restart_on_crash and target == "local":  # the crash supervisor, beside the server
        from servetool.operate import supervise

        result["supervisor_pid"] = supervise.launch(tgt.opts)
    if watch_source:
        from servetool.operate import watch

        result["watcher_pid"] = watch.launch(
            tgt, watch_source, endpoint_url=endpoint_url, interval_s=interval_s, keep=keep,
            metrics_port=watch.DEFAULT_METRICS_PORT if watch_metrics_port is None
            else watch_metrics_port)
        result["watching"] = watch_source
    emit(result, as_json, deploy_summary(result))


def kube_summary(result: dict[str, Any]) -> str:
    lines = [f"Manifests in {result['folder']} (overlay {result['overlay']}), image {result['image']}:",
             "  " + ", ".join(result["objects"])]
    if result["dry_run"]:
        lines.append(f"Dry run: nothing applied. Apply with: {result['apply_with']}")
    elif result.get("engine") == "kserve":
        lines.append(f"Applied to namespace {result['namespace']}: KServe's controller makes the "
                     "Deployment, Service and autoscaler (kubectl get inferenceservice)")
    else:
        lines.append(f"Applied to namespace {result['namespace']}; rollout: {result['rollout']}")
    if result.get("engine") == "kserve":  # KServe names the predictor's Service NAME-predictor
        service = f"{result['name']}-predictor"
        key = (f"the key is in {result['folder']}/secret.yaml" if result["token_auth"]
               else "no token: --no-token-auth")
        lines.append(f"Predict: kubectl -n {result['namespace']} port-forward svc/{service} "
                     f"8080:80, then curl -H 'Authorization: Bearer KEY' -T FILE "
                     f"http://127.0.0.1:8080/predictions/MODEL ({key}); Open Inference Protocol: "
                     "/v2/models/MODEL/infer")
        return "\n".join(lines)
    service = next(o.split("/", 1)[1] for o in result["objects"] if o.startswith("Service/"))
    lines.append(f"Predict: kubectl -n {result['namespace']} port-forward svc/{service} 8080:8080, then "
                 "curl -H @<(servetool token --header --target kubernetes --name "
                 f"{result['name']}) -T FILE http://127.0.0.1:8080/predictions/MODEL"
                 if result["token_auth"] else
                 f"Predict: kubectl -n {result['namespace']} port-forward svc/{service} 8080:8080, then "
                 "curl -T FILE http://127.0.0.1:8080/predictions/MODEL (no token: --no-token-auth)")
    return "\n".join(lines)


def deploy_summary(result: dict[str, Any]) -> str:
    ep = result["endpoints"]
    where = (f"container {result['container']} from {result['image']['tag']}"
             if result["target"] == "docker" else f"run folder {result['run_dir']}")
    engine = "KServe engine" if result.get("engine") == "kserve" else "TorchServe"
    lines = [f"{engine} {'started' if result['server_started'] else 'already running'} ({where})",
             f"  inference:  {ep['inference']}",
             f"  management: {ep['management']}",
             f"  metrics:    {ep['metrics']}"]
    if ep.get("clients"):  # OpenAI SDK: base_url=<this>/v1; TEI-style: <this>/embed, /rerank
        lines.append(f"  clients:    {ep['clients']} (OpenAI /v1/embeddings, TEI /embed /rerank)")
    for m in result["models"]:
        ready = sum(w["status"] == "READY" for w in m["workers"])
        lines.append(f"  {m['name']} {m['version']}: {m['action']}, {ready} worker(s) READY, "
                     f"{m['predictions_url']}")
    flag = " --target docker" if result["target"] == "docker" else ""
    # The header from a pipe, not the command line: `ps` shows every local user a process's args.
    auth = (f"-H @<(servetool token --header{flag}) " if result["token_auth"] else "")
    if result["models"]:
        first = result["models"][0]
        lines += ["", "Predict with curl (token auth is on; `servetool token` prints the current key):",
                  f"  curl {auth}-T IMAGE_OR_JSON_FILE {first['predictions_url']}"]
    if result.get("watching"):
        lines.append(f"Watching {result['watching']} for new versions (pid {result['watcher_pid']})")
    lines += [f"Scale: servetool scale NAME --workers N{flag}    Status: servetool status{flag}    "
              f"Stop: servetool stop{flag}"]
    return "\n".join(lines)


@main.command("image")
@click.argument("models", nargs=-1)
@click.option("--model-store", type=click.Path(path_type=Path), envvar="SERVETOOL_MODEL_STORE",
              default="model_store", show_default=True, help="Folder of .mar archives.")
@click.option("--config", "base_config", type=click.Path(path_type=Path), default=None,
              help="Base TorchServe config.properties [default: ./config.properties if present].")
@click.option("--base-image", default=None, help="The image to build on [default: "
              "python:3.11-slim-bookworm].")
@click.option("--tag", default=None, help="Tag for the image, e.g. REGISTRY/servetool-digits:1.0 "
              "[default: servetool/NAMES:DIGEST].")
@click.option("--no-models", is_flag=True,
              help="Bake no archives (they come from a volume: --mount-models / --models-pvc).")
@click.option("--with-watcher", is_flag=True,
              help="Carry the pods' watcher (servetool's code, boto3): the image that "
                   "`deploy --target kubernetes --watch` names.")
@click.option("--with-split", is_flag=True,
              help="Carry HAProxy and servetool's exporter for the canary split: the image that "
                   "`deploy --target kubernetes --split` names.")
@click.option("--ca-cert", "ca_certs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A CA certificate pip needs during the build (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default="deploy/docker", show_default=True,
              help="Where the build context is rendered.")
@json_option
@friendly_errors
def image_command(models: tuple[str, ...], model_store: Path, base_config: Path | None,
                  base_image: str | None, tag: str | None, no_models: bool, with_watcher: bool,
                  with_split: bool, ca_certs: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """Build the serving image for MODELS (default: every archive) with the local Docker engine.

    The image `deploy --target docker` runs and `deploy --target kubernetes --image` names: push it
    to a registry your cluster pulls from (`docker push TAG`).
    """
    from servetool.targets.common import find_archives
    from servetool.targets.image import DEFAULT_BASE_IMAGE, ImageOptions, build_image

    base_config = base_config or default_config()
    archives = find_archives(models, model_store)
    opts = ImageOptions(model_store=model_store, out_dir=out, base_image=base_image or DEFAULT_BASE_IMAGE,
                        base_config=base_config, bake_models=not no_models, tag=tag,
                        ca_certs=list(ca_certs) or None, with_watcher=with_watcher,
                        with_split=with_split)
    result = build_image(opts, archives, progress)
    result["models"] = [p.stem for p in archives]
    size = f"{result['size_bytes'] / 1e6:.0f} MB" if result.get("size_bytes") else "size unknown"
    emit(result, as_json, f"{result['tag']} ({size}, {'built' if result['built'] else 'already built'})"
         f"\nPush it where your cluster pulls from: docker push {result['tag']}")


@main.command()
@click.argument("model")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--version", "model_version", default=None, help="A model version (default: the default).")
@click.option("--content-type", default=None,
              help="Content type to send [default: application/json for .json, else "
                   "application/octet-stream].")
@server_options
@json_option
@friendly_errors
def predict(model: str, file: Path, model_version: str | None, content_type: str | None,
            run_dir: Path, model_store: Path, target: str, as_json: bool) -> None:
    """Send FILE to MODEL's prediction endpoint and print the answer."""
    check_model_args(model, model_version)
    client = make_target(run_dir, model_store, target).client()
    if content_type is None:
        guessed = mimetypes.guess_type(file.name)[0]
        content_type = "application/json" if guessed == "application/json" else "application/octet-stream"
    payload = file.read_bytes()
    reply = client.predict(model, payload, content_type, model_version)
    try:
        body: Any = reply.json()
    except ValueError:
        body = reply.text
    if reply.status_code != 200:
        detail = body.get("error") or body.get("message") if isinstance(body, dict) else body
        limit = server_setting(client.state, "max_request_size")
        raise ServetoolError(f"{model} answered {reply.status_code}: " + explain_failure(
            reply.status_code, str(detail or ""), len(payload), int(limit) if limit else None))
    emit({"model": model, "status": reply.status_code, "prediction": body}, as_json,
         json.dumps(body, indent=2))


@main.command()
@click.argument("model")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Number of TorchServe workers for the model (in every pod, on kubernetes).")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="kubernetes: number of pods (the autoscaler's minimum follows).")
@click.option("--version", "model_version", default=None, help="A model version (default: the default).")
@server_options
@kube_options
@json_option
@friendly_errors
def scale(model: str, workers: int | None, replicas: int | None, model_version: str | None,
          run_dir: Path, model_store: Path, target: str, kubeconfig: Path | None,
          kube_context: str | None, namespace: str, deployment_name: str | None,
          manifests_dir: Path, as_json: bool) -> None:
    """Set MODEL's worker count through the management API and wait until they are READY.

    On kubernetes, --replicas scales pods and --workers reaches every pod's management API (and
    the ConfigMap, so that pods started later get the same count).
    """
    check_model_args(model, model_version)
    if target == "kubernetes":
        if workers is None and replicas is None:
            raise ServetoolError("give --workers N and/or --replicas N")
        kube = kube_target(kubeconfig, kube_context, manifests_dir)
        name = require_name(deployment_name)
        result: dict[str, Any] = {"target": target, "model": model}
        if replicas is not None:
            result["replicas"] = kube.scale_replicas(namespace, name, replicas)
        if workers is not None:
            result["workers"] = kube.scale_workers(namespace, name, model, workers)
        emit(result, as_json, json.dumps(result, indent=2))
        return
    if replicas is not None:
        raise ServetoolError("--replicas is for --target kubernetes; use --workers here")
    if workers is None:
        raise ServetoolError("give --workers N")
    result = make_target(run_dir, model_store, target).scale(model, workers, model_version)
    emit(result, as_json, f"{model} {result['version']}: {len(result['workers'])} worker(s) READY")


@main.command()
@server_options
@kube_options
@json_option
@friendly_errors
def status(run_dir: Path, model_store: Path, target: str, kubeconfig: Path | None,
           kube_context: str | None, namespace: str, deployment_name: str | None,
           manifests_dir: Path, as_json: bool) -> None:
    """Show the server, its models, versions and workers (on kubernetes: the pods)."""
    if target == "kubernetes":
        kube = kube_target(kubeconfig, kube_context, manifests_dir)
        result = kube.status(namespace, require_name(deployment_name))
        lines = [f"{p['name']}: {'ready' if p['ready'] else 'not ready'}" for p in result["pods"]]
        emit(result, as_json, "\n".join(lines) or "no running pods")
        return
    result = make_target(run_dir, model_store, target).status()
    if result.get("state") == "crashed":  # a problem, said as one: exit 1
        emit(result, as_json, result["detail"])
        sys.exit(1)
    if not result["running"]:
        text = f"no TorchServe running from {run_dir}"
        if result.get("container"):
            text = (f"container {result['container']} is {result['container_status']}.\n"
                    + result.get("logs", ""))
        emit(result, as_json, text)
        return
    ep = result["endpoints"]
    where = (f"container {result['container']}, {result['health'] or 'no health yet'}"
             if target == "docker" else f"pid {result['pid']}")
    engine = "KServe engine" if result.get("engine") == "kserve" else "TorchServe"
    lines = [f"{engine} running ({where}): inference {ep['inference']}, "
             f"management {ep['management']}, metrics {ep['metrics']}"]
    for m in result["models"] or []:
        if m.get("error"):
            lines.append(f"  {m['name']!r}: {m['error']}")
            continue
        states = ", ".join(f"{w['id']}:{w['status']}" for w in m["workers"]) or "no workers"
        default = " (default)" if m["default"] else ""
        lines.append(f"  {m['name']} {m['version']}{default}: batch {m['batch_size']}, "
                     f"workers [{states}]")
    if not result["models"]:
        lines.append("  no models registered")
    lines += watcher_lines(result.get("watcher"))
    lines += helper_lines(result.get("helpers"))
    if result.get("canary"):
        c = result["canary"]
        lines.append(f"Canary of {c['model']}: {c['weight']}% to {c['candidate']} (default "
                     f"{c['default']}), {c['status']}" + (f": {c['reason']}" if c.get("reason")
                                                           else ""))
    emit(result, as_json, "\n".join(lines))


def helper_lines(helpers: dict[str, Any] | None) -> list[str]:
    """The helpers servetool keeps running beside the server that have crashed, and when."""
    lines = []
    for name, record in sorted((helpers or {}).items()):
        if record.get("restarts"):
            last = record["crashes"][-1] if record.get("crashes") else {}
            lines.append(f"Helper {name}: restarted {record['restarts']} time(s), last "
                         f"{last.get('at', '?')} ({last.get('reason', '?')}), pid {record.get('pid')}")
    return lines


def watcher_lines(watcher: dict[str, Any] | None) -> list[str]:
    if not watcher:
        return []
    state = f"running (pid {watcher['pid']})" if watcher["running"] else "not running"
    lines = [f"Watcher of {watcher['source']}: {state}, every {watcher['interval_s']:g} s, last "
             f"check {watcher['last_check'] or 'never'}"
             + (f", metrics {watcher['metrics']}" if watcher.get("metrics") else "")]
    if watcher.get("last_error"):
        lines.append(f"  last check failed: {watcher['last_error']}")
    for model, event in sorted(watcher["events"].items()):
        lines.append(f"  {model} {event['version']}: {event['outcome']} at {event['at']}: "
                     f"{event['detail']}")
    return lines


@main.command()
@click.option("--kind", type=click.Choice(["inference", "management"]), default="inference",
              show_default=True)
@click.option("--header", "as_header", is_flag=True,
              help="Print the whole header line, for curl's -H @FILE: "
                   "curl -H @<(servetool token --header) ... keeps the key out of `ps`.")
@server_options
@kube_options
@friendly_errors
def token(kind: str, as_header: bool, run_dir: Path, model_store: Path, target: str,
          kubeconfig: Path | None, kube_context: str | None, namespace: str,
          deployment_name: str | None, manifests_dir: Path) -> None:
    """Print the running server's current API key, for `Authorization: Bearer ...`.

    On kubernetes: the key every replica's gateway accepts (from the overlay's Secret).
    Keep keys out of command lines (every local user can read those with `ps`): give curl the
    header from a file or a pipe, `curl -H @<(servetool token --header) ...`.
    """
    if target == "kubernetes":
        from servetool.targets.manifests import read_key

        overlay = manifests_dir / "overlays" / require_name(deployment_name)
        key = read_key(overlay) if kind == "inference" else None
        if key is None:
            raise ServetoolError(f"no inference key in {overlay}/secret.yaml (rendered with "
                                 "--no-token-auth, or not rendered here); the management API is "
                                 "reached through `kubectl exec`/`servetool scale`")
        click.echo(f"Authorization: Bearer {key}" if as_header else key)
        return
    key = make_target(run_dir, model_store, target).client().token(kind)
    if key is None:
        raise ServetoolError("token authorization is off on this server: send no header")
    click.echo(f"Authorization: Bearer {key}" if as_header else key)


@main.command()
@server_options
@json_option
@friendly_errors
def stop(run_dir: Path, model_store: Path, target: str, as_json: bool) -> None:
    """Stop the server, its JVM and every worker."""
    tgt = make_target(run_dir, model_store, target)
    before = tgt.condition()
    running = tgt.running() if before != "stopped" else None
    server = "the KServe engine" if running and running.engine == "kserve" else "TorchServe"
    was_running = tgt.down()
    if before == "crashed":
        text = f"{server} had crashed; what was left of it is stopped"
    elif was_running:
        text = f"{server} stopped" + (" and its container removed" if target == "docker" else "")
    else:
        text = f"no server was running from {run_dir} ({target})"
    text = text[0].upper() + text[1:]
    emit({"target": target, "stopped": was_running, "was": before}, as_json, text)

